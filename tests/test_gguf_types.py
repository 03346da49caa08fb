"""GGUF files of every tensor type refllm reads, written here, against the `gguf` package.

For each type in `gguf_to_hf.TENSOR_TYPES` a tiny Llama (hidden 256, so that a row is
whole K-quant super-blocks of 256; grouped-query attention, so that the K rows are
permuted with their own head count) is written as a GGUF whose matrices have that type
and whose norms stay F32, as llama.cpp's quantizer leaves them:

- F32, F16, BF16, Q8_0, Q4_0, Q4_1: quantized with `gguf.quants.quantize`.
- Q4_K, Q6_K: the `gguf` package cannot quantize them (NotImplementedError), so their
  blocks are random bytes with a valid float16 super-scale (Q4_K's `d` and `dmin`, at
  bytes 0-3 of each 144-byte block; Q6_K's `d`, at bytes 208-209 of each 210-byte block),
  every other bit pattern of a block being a valid quant or sub-block scale.

Then the model refllm loads from the file (`--model x.gguf`, i.e. `local_model_dir`)
must hold, for every tensor, exactly `gguf.quants.dequantize` of the file's bytes, the
Q and K rows permuted back from llama.cpp's order (checked by permuting ours forward with
`hf_to_gguf.permute_for_gguf`, llama.cpp's own `permute`), and its logits and greedy
tokens must be those of transformers' GGUF loader on the same file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from refllm.checkpoint import load_checkpoint  # noqa: E402
from refllm.errors import InvalidInputError, LLMRuntimeError  # noqa: E402
from refllm.llama import Llama  # noqa: E402
from refllm.weights.gguf_to_hf import TENSOR_TYPES, hf_name  # noqa: E402
from refllm.weights.hf_to_gguf import permute_for_gguf, write_f32_gguf  # noqa: E402
from refllm.weights.pull import local_model_dir, pull_gguf  # noqa: E402
from tests.llama_util import make_tiny_llama  # noqa: E402
from tests.tiny_models import CHAT_TEMPLATE, make_tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")  # by gguf.quants.quantize
K_QUANT_SCALES = {"Q4_K": ((0, 2), 1e-4), "Q6_K": ((208,), 2e-5)}  # f16 offsets in a block, their size
PROMPT = [0, 45, 112, 7, 260, 31, 99]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where .gguf conversions go


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny HF Llama (with a byte-level BPE tokenizer), every row a multiple of 256 long."""
    d = tmp_path_factory.mktemp("tiny-hf")
    vocab = make_tokenizer(d / "tokenizer.json")
    make_tiny_llama(d, dict(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                            max_position_embeddings=64, bos_token_id=0, eos_token_id=1), seed=3)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE, "bos_token": "<s>",
                                                         "eos_token": "</s>"}))
    return d


def random_k_blocks(kind: str, rows: int, cols: int, rng) -> np.ndarray:  # -> [rows, bytes per row] uint8
    """Valid random K-quant blocks: random bytes, then a float16 scale in each scale slot."""
    block, size = gguf.GGML_QUANT_SIZES[Q[kind]]  # 256 weights, 144 / 210 bytes
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    offsets, scale = K_QUANT_SCALES[kind]
    for offset in offsets:
        d = (scale * rng.uniform(0.5, 1.5, size=(rows, cols // block))).astype("<f2")
        raw[:, :, offset : offset + 2] = d.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def write_typed_gguf(hf_dir, path, kind: str, seed: int = 0):
    """The F32 GGUF of `hf_dir` (hf_to_gguf.write_f32_gguf) rewritten with its matrices as `kind`."""
    f32 = write_f32_gguf(hf_dir, path.with_name(path.stem + "-f32.gguf"))
    reader = gguf.GGUFReader(str(f32))
    writer = gguf.GGUFWriter(str(path), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # the header, and the key GGUFWriter writes itself
        array = field.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=field.types[-1] if array else None)
    rng = np.random.default_rng(seed)
    for t in reader.tensors:
        data = np.array(t.data)  # [rows, cols] float32 in NumPy order
        if data.ndim == 1:  # the norms stay F32, as llama.cpp's quantizer leaves them
            writer.add_tensor(t.name, data)
        elif kind in K_QUANT_SCALES:
            writer.add_tensor(t.name, random_k_blocks(kind, *data.shape, rng), raw_dtype=Q[kind])
        else:
            q = gguf.quants.quantize(data, Q[kind])
            writer.add_tensor(t.name, q, raw_dtype=Q[kind] if q.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    f32.unlink()
    return path


@pytest.fixture(scope="module", params=TENSOR_TYPES)
def typed_gguf(request, hf_dir, tmp_path_factory):
    kind = request.param
    return kind, write_typed_gguf(hf_dir, tmp_path_factory.mktemp(kind) / f"tiny-{kind}.gguf", kind)


def test_the_test_covers_the_types_of_the_brief():
    assert set(TENSOR_TYPES) == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"}
    assert set(TENSOR_TYPES) == set(QUANTIZABLE) | set(K_QUANT_SCALES)
    for kind in K_QUANT_SCALES:  # still true? then the random blocks are still needed
        with pytest.raises(NotImplementedError):
            gguf.quants.quantize(np.zeros((1, 256), np.float32), Q[kind])


def test_every_tensor_is_the_gguf_packages_dequantization(typed_gguf, hf_dir):
    kind, path = typed_gguf
    reader = gguf.GGUFReader(str(path))
    ours = load_checkpoint(local_model_dir(path))
    config = json.loads((hf_dir / "config.json").read_text())
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    seen = set()
    for t in reader.tensors:
        assert t.tensor_type == (Q.F32 if len(t.shape) == 1 else Q[kind]), t.name
        expected = gguf.quants.dequantize(t.data, t.tensor_type)  # [rows, cols], llama.cpp's row order
        mine = np.asarray(ours[hf_name(t.name)])
        assert mine.dtype == np.float32
        role = t.name.split(".")[-2]
        if role in heads:  # ours is in Hugging Face's order: permute it as llama.cpp's converter does
            mine = permute_for_gguf(mine, heads[role])
        np.testing.assert_array_equal(mine, expected, err_msg=f"{kind} {t.name}")
        seen.add(hf_name(t.name))
    assert seen == set(ours)


def test_quantized_weights_are_near_the_originals(typed_gguf, hf_dir):
    """Against the float32 weights they were quantized from (not the random K-quant blocks):
    catches a dequantization that is self-consistent but laid out wrong."""
    kind, path = typed_gguf
    if kind in K_QUANT_SCALES:
        pytest.skip("random blocks: there are no original weights")
    ours, original = load_checkpoint(local_model_dir(path)), load_checkpoint(hf_dir)
    tolerance = {"F32": 0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2, "Q4_0": 0.2, "Q4_1": 0.2}[kind]
    for name, w in original.items():
        w = np.asarray(w)
        error = np.abs(np.asarray(ours[name]) - w).max() / np.abs(w).max()
        assert error <= tolerance, f"{kind} {name}: relative error {error:.3g}"


def test_logits_and_greedy_tokens_match_transformers_gguf_loader(typed_gguf):
    import torch
    from transformers import AutoModelForCausalLM

    kind, path = typed_gguf
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    model = Llama.from_pretrained(path)  # --model x.gguf
    with torch.no_grad():
        expected = theirs(torch.tensor([PROMPT])).logits[0].numpy()
        greedy = theirs.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                                 max_new_tokens=6, do_sample=False, pad_token_id=0)
    np.testing.assert_allclose(model(PROMPT), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())

    cache = model.new_cache(len(PROMPT) + 6)
    logits = model(PROMPT, cache, last_only=True)[0]
    tokens = []
    for _ in range(6):
        tokens.append(int(np.argmax(logits)))
        logits = model.decode(tokens[-1], cache)
    assert tokens == greedy[0, len(PROMPT):].tolist()


def test_pull_gguf_installs_a_named_model(hf_dir, tmp_path):
    from refllm.cli import main

    path = write_typed_gguf(hf_dir, tmp_path / "tiny-q8.gguf", "Q8_0")
    root = tmp_path / "models"
    assert main(["pull", "--gguf", str(path), "my-tiny", "--models-dir", str(root), "--quiet"]) == 0
    installed = root / "llama" / "my-tiny"
    assert sorted(p.name for p in installed.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert not list((root / "llama").glob(".tmp-*"))
    np.testing.assert_array_equal(Llama.from_pretrained(installed)(PROMPT), Llama.from_pretrained(path)(PROMPT))
    assert pull_gguf(path, "my-tiny", root=root) == installed  # there already: nothing to do


def test_unreadable_types_and_files_are_clear_errors(hf_dir, tmp_path):
    path = write_typed_gguf(hf_dir, tmp_path / "tiny-q5.gguf", "Q5_0")
    with pytest.raises(LLMRuntimeError, match="type Q5_0; the converter reads F32, F16, BF16"):
        Llama.from_pretrained(path)
    with pytest.raises(InvalidInputError, match="no such GGUF file"):
        local_model_dir(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all, just bytes" * 10)
    with pytest.raises(LLMRuntimeError, match="not a GGUF file refllm can read"):
        local_model_dir(tmp_path / "junk.gguf")
    assert not list((tmp_path / "cache" / "refllm" / "from-gguf").glob("*"))  # no half-built conversion left
