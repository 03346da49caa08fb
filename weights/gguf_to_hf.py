"""A llama.cpp GGUF file -> a Hugging Face Llama model directory, in float32.

    convert(gguf_path, out_dir)   writes, into an existing empty out_dir:
        config.json              LlamaForCausalLM fields, named as transformers names them
        model.safetensors        every tensor dequantized to float32, under its HF name
        tokenizer.json           byte-level BPE rebuilt from the GGUF's vocabulary and merges
        tokenizer_config.json    chat template, special token strings, add_bos/eos flags
        generation_config.json   bos_token_id, eos_token_id

What a GGUF holds (spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
metadata key/values (`llama.block_count`, `tokenizer.ggml.tokens`, ...) and tensors
whose shape is listed innermost-first (`ne[0]` is the row length), so the GGUF shape
`[576, 1536]` is the NumPy / PyTorch shape `(1536, 576)`. The `gguf` package's
`GGUFReader` already hands the data over in NumPy order, and `gguf.quants.dequantize`
turns a quantized block array (Q4_1, Q8_0, ...) into float32 of that shape.

Three things the conversion has to undo or rebuild:

1. Names. llama.cpp renames every tensor (`blk.3.attn_q.weight`); `HF_NAMES` maps them
   back to transformers' `model.layers.3.self_attn.q_proj.weight`.

2. The Q/K row permutation. Hugging Face Llama checkpoints apply RoPE in the
   "rotate-half" layout (dimension i is paired with i + head_dim/2); llama.cpp applies it
   to adjacent pairs (2i, 2i+1). When llama.cpp's `convert_hf_to_gguf.py` writes a Llama
   model it therefore reorders the rows of `q_proj` and `k_proj` inside every head:

       def permute(weights, n_head, n_head_kv):          # convert_hf_to_gguf.py, LlamaModel
           if n_head_kv is not None and n_head != n_head_kv:
               n_head = n_head_kv
           return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
                   .swapaxes(1, 2)
                   .reshape(weights.shape))

   called with `n_head` for attn_q and `n_head_kv` for attn_k. `unpermute` below is its
   inverse. Without it the model still runs but attends to the wrong positions and its
   generations drift after a few tokens.

3. The tokenizer. A GGUF has no tokenizer.json; `weights/gguf_tokenizer.py` rebuilds it
   from the vocabulary, merges and token types.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from refllm.errors import LLMRuntimeError

# The tokenizer has a module of its own; its names stay importable from here.
from .gguf_tokenizer import CONTROL, USER_DEFINED, build_tokenizer, eos_token_ids, pre_tokenizer, tokenizer_config  # noqa: F401

# ---------------------------------------------------------------------------------------
# Reading the GGUF
# ---------------------------------------------------------------------------------------


def read_metadata(reader) -> dict:
    """Every metadata key of a `gguf.GGUFReader` as a Python value (str, int, float, list)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the header (version, counts), not metadata
            continue
        meta[key] = field.contents()
    return meta


def _float32_value(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))  # str: the shortest decimal that rounds back


# ---------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------


def llama_config(meta: dict, tensor_names: set[str]) -> dict:
    """transformers' LlamaConfig fields, from the `llama.*` and `tokenizer.ggml.*` keys."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise LLMRuntimeError(f"GGUF architecture is {arch!r}; only 'llama' can be converted")

    def key(name: str, default=None):
        value = meta.get(f"llama.{name}", default)
        if value is None:
            raise LLMRuntimeError(f"GGUF metadata lacks 'llama.{name}'")
        return value

    if "rope_freqs.weight" in tensor_names:  # Llama 3.1+: the scaled frequencies as a tensor
        raise LLMRuntimeError("llama3 RoPE scaling from a GGUF is not supported (the file has rope_freqs.weight); "
                              "use the model's Hugging Face directory")

    hidden_size = int(key("embedding_length"))
    n_head = int(key("attention.head_count"))
    n_head_kv = int(key("attention.head_count_kv", n_head))
    head_dim = int(key("rope.dimension_count", hidden_size // n_head))
    vocab_size = int(meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"]))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": _float32_value(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_value(key("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "use_cache": True,
    }
    for name in ("bos", "eos", "pad"):
        token_id = meta.get(f"tokenizer.ggml.{'padding' if name == 'pad' else name}_token_id")
        if token_id is not None:
            config[f"{name}_token_id"] = int(token_id)
    return config


def _rope_scaling(meta: dict) -> dict | None:
    kind = meta.get("llama.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float32_value(meta["llama.rope.scaling.factor"])}
    raise LLMRuntimeError(f"GGUF rope scaling {kind!r} is not supported by the converter")


# ---------------------------------------------------------------------------------------
# Tensors: names, dequantization, the Q/K permutation
# ---------------------------------------------------------------------------------------

# GGUF name -> Hugging Face name; `{i}` is the layer index.
HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    m = _LAYER.match(gguf_name)
    pattern, i = (f"blk.{{i}}.{m.group(2)}", m.group(1)) if m else (gguf_name, None)
    if pattern not in HF_NAMES:
        raise LLMRuntimeError(f"GGUF tensor '{gguf_name}' has no Hugging Face Llama equivalent")
    return HF_NAMES[pattern].format(i=i)


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the Llama config needs, with its shape ([out, in] for Linear)."""
    H, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    D, N, K = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, H)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (N * D, H),
            p + "self_attn.k_proj.weight": (K * D, H),
            p + "self_attn.v_proj.weight": (K * D, H),
            p + "self_attn.o_proj.weight": (H, N * D),
            p + "post_attention_layernorm.weight": (H,),
            p + "mlp.gate_proj.weight": (I, H),
            p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I),
        }
    return shapes


# The tensor types the converter reads, each tested against `gguf.quants.dequantize` in
# tests/test_gguf_types.py. A block of Q8_0 / Q4_0 / Q4_1 holds 32 weights and one f16
# scale (Q4_1: and a minimum); the K-quants hold 256 weights in 8 (Q4_K) or 16 (Q6_K)
# sub-blocks with their own 6- or 8-bit scales under one f16 super-scale (llama.cpp's
# ggml-quants.c, `dequantize_row_*`), dequantized here to float32 as llama.cpp does.
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")


def dequantize(tensor) -> np.ndarray:
    """A `gguf.ReaderTensor` as a float32 array in NumPy order (GGUF shape reversed)."""
    import gguf

    kind = gguf.GGMLQuantizationType(tensor.tensor_type)
    if kind.name not in TENSOR_TYPES:
        raise LLMRuntimeError(f"GGUF tensor '{tensor.name}' has type {kind.name}; "
                              f"the converter reads {', '.join(TENSOR_TYPES)}")
    out = np.array(gguf.quants.dequantize(tensor.data, kind), dtype=np.float32)  # a copy, off the memmap
    shape = tuple(int(n) for n in reversed(tensor.shape))
    if out.shape != shape:
        raise LLMRuntimeError(f"GGUF tensor '{tensor.name}' dequantized to {out.shape}, expected {shape}")
    return out


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:  # [n_head * D, H] -> [n_head * D, H]
    """Inverse of convert_hf_to_gguf.py's `permute`: llama.cpp's interleaved RoPE rows back to rotate-half.

    Within each head llama.cpp's row order is (pair 0: x0 y0, pair 1: x1 y1, ...) and
    Hugging Face's is (x0 x1 ... | y0 y1 ...); view the rows as [head, D/2, 2] and swap
    the last two axes.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_tensors(reader, config: dict, progress: bool = False) -> dict[str, np.ndarray]:
    """Every GGUF tensor, dequantized, unpermuted and renamed; checked against the config."""
    from tqdm.auto import tqdm

    tensors = {}
    for t in tqdm(reader.tensors, desc="dequantize", unit="tensor", disable=not progress, leave=False):
        name = hf_name(t.name)
        w = dequantize(t)
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute(w, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute(w, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(w)

    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [f"{n}: {tensors[n].shape} != {expected[n]}" for n in expected if n in tensors and tensors[n].shape != expected[n]]
    if missing or extra or wrong:
        raise LLMRuntimeError(f"GGUF tensors do not match the Llama config: missing {missing}, "
                              f"unexpected {extra}, wrong shapes {wrong}")
    return tensors


# ---------------------------------------------------------------------------------------
# The whole directory
# ---------------------------------------------------------------------------------------


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_weights(tensors: dict[str, np.ndarray], path: Path) -> None:
    """model.safetensors, float32, with the `format: pt` tag transformers asks for."""
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def convert(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = False) -> None:
    """Write the Hugging Face Llama directory for `gguf_path` into `out_dir` (which must exist).

    Not atomic by itself: `refllm.weights.pull` calls it on a temporary directory and
    renames that into place.
    """
    from gguf import GGUFReader

    out = Path(out_dir)
    reader = GGUFReader(str(gguf_path))
    meta = read_metadata(reader)
    config = llama_config(meta, {t.name for t in reader.tensors})

    tokenizer = build_tokenizer(meta)  # first: a tokenizer we cannot build fails before the slow part
    tensors = convert_tensors(reader, config, progress=progress)
    write_weights(tensors, out / "model.safetensors")
    del tensors, reader

    _write_json(out / "config.json", config)
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config(meta, config["max_position_embeddings"]))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    if eos_token_ids(meta) is not None:
        generation["eos_token_id"] = eos_token_ids(meta)  # with <|eot_id|>, as transformers' generate reads it
    _write_json(out / "generation_config.json", generation)
