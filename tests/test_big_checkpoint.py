"""Half-precision checkpoints run from the mapped file, one widened matrix at a time.

`Llama.from_pretrained(dir, widen_on_use=True)` keeps the bfloat16/float16 matrices in
the file and widens each into a shared scratch buffer when a layer uses it
(`refllm.half_weights`). Widening is exact, so the logits must be those of the model
with every weight copied to float32 (and of transformers on the same file, loaded in
float32), while memory stays near the file's size: checked on a tiny model here and, in
the slow test, on a 2-layer checkpoint at Llama-2-7B's widths, its peak RSS measured in
a process of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from refllm.checkpoint import BFloat16, StrictLoader, load_checkpoint, read_safetensors
from refllm.config import LlamaConfig
from refllm.half_weights import WidenedLayer, should_widen_on_use
from refllm.llama import Llama
from tests.llama_util import hf_logits, hf_model, write_random_llama

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
PROMPT = [3, 17, 42, 5, 88, 1, 60, 29]


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def half_dir(request, tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp(request.param), TINY, dtype=request.param, seed=1)


def test_bfloat16_tensors_read_as_torch_reads_them(tmp_path):
    """A bfloat16 tensor stays a view of the file (`BFloat16`), and widens to torch's float32."""
    import torch
    from safetensors.torch import load_file

    d = write_random_llama(tmp_path, TINY, dtype="bfloat16")
    ours, theirs = read_safetensors(d / "model.safetensors"), load_file(d / "model.safetensors")
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        assert t.dtype == torch.bfloat16 and isinstance(ours[name], BFloat16)
        np.testing.assert_array_equal(np.asarray(ours[name]), t.float().numpy(), err_msg=name)
        np.testing.assert_array_equal(ours[name].astype(np.float64), t.double().numpy(), err_msg=name)
    rows = [4, 0, 96]
    np.testing.assert_array_equal(ours["model.embed_tokens.weight"][rows].astype(np.float32),
                                  theirs["model.embed_tokens.weight"][rows].float().numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_widened_model_equals_the_copied_model(half_dir, dtype):
    """widen_on_use=True gives the logits of the model whose weights are copied (float32 /
    float64 both), through the whole-prompt pass and one-token decode steps."""
    widened = Llama.from_pretrained(half_dir, dtype=dtype, widen_on_use=True)
    copied = Llama.from_pretrained(half_dir, dtype=dtype, widen_on_use=False)
    assert all(isinstance(layer, WidenedLayer) for layer in widened.layers)
    assert not any(isinstance(layer, WidenedLayer) for layer in copied.layers)
    rtol = 1e-5 if dtype == np.float32 else 1e-12  # the same products, BLAS over another memory layout
    np.testing.assert_allclose(widened(PROMPT), copied(PROMPT), rtol=rtol, atol=rtol)

    cw, cc = widened.new_cache(32), copied.new_cache(32)
    widened(PROMPT, cw, last_only=True)
    copied(PROMPT, cc, last_only=True)
    for token in (7, 11, 13):
        np.testing.assert_allclose(widened.decode(token, cw), copied.decode(token, cc), rtol=rtol, atol=rtol)


def test_widened_model_matches_transformers(half_dir):
    """transformers reads the same half-precision file and computes in float32."""
    import torch

    ours = Llama.from_pretrained(half_dir, widen_on_use=True)(PROMPT)
    theirs = hf_logits(half_dir, PROMPT, torch.float32)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_widened_layers_copy_no_matrix(half_dir):
    """The layers' matrices are the file's bytes; a forward pass widens them into one small
    scratch buffer of the thread's, never into a whole float32 matrix."""
    from refllm import half_weights

    model = Llama.from_pretrained(half_dir, widen_on_use=True)
    for layer in model.layers:
        for matrix in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
            for part in matrix.parts:
                bits = part.bits if isinstance(part, BFloat16) else part
                assert not bits.flags.owndata and not bits.flags.writeable  # a read-only view of the mapping
    half_weights._scratch.__dict__.clear()
    model(PROMPT)
    assert half_weights._scratch.buf.nbytes <= half_weights.BLOCK_BYTES
    # The embedding stays mapped too (looked up by rows); the head is a float32 copy.
    assert isinstance(model.embed_tokens, (BFloat16, np.ndarray)) and model.lm_head.dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("half", ["bfloat16", "float16"])
def test_half_matrix_products_equal_the_widened_matrix(half, dtype, monkeypatch):
    """W @ x, np.matmul(W, x, out=), X @ W.T over blocks of rows (small blocks here, so that
    every part is cut, unevenly) equal the products with the whole matrix in `dtype`."""
    import torch

    from refllm import half_weights
    from refllm.half_weights import HalfMatrix

    monkeypatch.setattr(half_weights, "BLOCK_BYTES", 7 * 24 * np.dtype(dtype).itemsize)  # 7 rows of 24
    rng = np.random.default_rng(0)
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[half]
    parts_t = [torch.tensor(rng.standard_normal((n, 24)), dtype=torch_dtype) for n in (10, 3, 16)]
    if half == "bfloat16":
        parts = [BFloat16(t.view(torch.int16).numpy().view(np.uint16)) for t in parts_t]
    else:
        parts = [t.numpy() for t in parts_t]
    full = torch.cat(parts_t).to(torch.float64).numpy().astype(dtype)  # [29, 24]
    W = HalfMatrix(parts, dtype)
    assert W.shape == (29, 24) and W.T.shape == (24, 29)
    np.testing.assert_array_equal(np.asarray(W), full)
    x, X, V = (rng.standard_normal(s).astype(dtype) for s in ((24,), (5, 24), (24, 3)))
    eps = 1e-6 if dtype == np.float32 else 1e-14  # BLAS may sum in another order

    def close(ours, expected):
        np.testing.assert_allclose(ours, expected, rtol=eps, atol=eps * np.abs(expected).max())

    close(W @ x, full @ x)
    close(W @ V, full @ V)
    close(X @ W.T, X @ full.T)
    out = np.empty(29, dtype)
    assert np.matmul(W, x, out=out) is out
    close(out, full @ x)
    out = np.empty((5, 29), dtype)
    np.matmul(X, W.T, out=out)
    close(out, X @ full.T)
    with pytest.raises(TypeError):
        np.add(W, 1)  # only products are defined


def test_automatic_choice_follows_available_memory(half_dir, tmp_path):
    config = LlamaConfig.from_file(half_dir / "config.json")
    w = StrictLoader(load_checkpoint(half_dir), np.float32, "test")
    float32_bytes = 4 * sum(t.size for t in w.tensors.values())
    assert should_widen_on_use(w, np.float32, available=float32_bytes)  # would not fit in 80% of it
    assert not should_widen_on_use(w, np.float32, available=2 * float32_bytes)
    assert config.num_hidden_layers == 2

    from tests.llama_util import make_tiny_llama

    f32 = make_tiny_llama(tmp_path / "f32", {**TINY, "tie_word_embeddings": False})  # float32: never widened
    assert not should_widen_on_use(StrictLoader(load_checkpoint(f32), np.float32, "test"), np.float32, available=1)


# ---------------------------------------------------------------------------------------
# Llama-2-7B widths, 2 layers, bfloat16: against transformers, with the peak RSS
# ---------------------------------------------------------------------------------------

WIDTHS_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
NEW_TOKENS = 4
RSS_SLACK = 2 << 30  # the bound: peak RSS <= the checkpoint's size + 2 GiB

RUN_REFLLM = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from refllm.llama import Llama

    model_dir, out = sys.argv[1], sys.argv[2]
    prompt, new = json.loads(sys.argv[3]), int(sys.argv[4])
    model = Llama.from_pretrained(model_dir, widen_on_use=True)
    cache = model.new_cache(len(prompt) + new)
    logits = [model(prompt, cache, last_only=True)[0]]
    tokens = []
    for _ in range(new):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(model.decode(tokens[-1], cache))
    np.save(out + "/logits.npy", np.stack(logits[:-1]))  # [new, V]: the logits each token was chosen from
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    json.dump({"tokens": tokens, "peak_rss": peak}, open(out + "/result.json", "w"))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's")
def test_7b_widths_bfloat16_match_transformers_within_the_memory_bound(tmp_path_factory):
    """Two layers at hidden 4096, intermediate 11008, 32 heads, vocabulary 32000, bfloat16
    (1.34 GB): refllm widens on use, in a process of its own whose peak RSS must stay within
    the file's size + 2 GiB; transformers loads the same file in float32 (3.5 GB). The greedy
    tokens are equal and the logits they came from agree to 1e-4 of their range."""
    import torch

    d = write_random_llama(tmp_path_factory.mktemp("llama7b-2layers"), WIDTHS_7B, dtype="bfloat16", seed=7)
    size = (d / "model.safetensors").stat().st_size
    out = tmp_path_factory.mktemp("out")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", RUN_REFLLM, str(d), str(out), json.dumps(PROMPT), str(NEW_TOKENS)],
                   check=True, env=env, timeout=900)
    result = json.loads((out / "result.json").read_text())
    ours = np.load(out / "logits.npy")  # [NEW_TOKENS, V]
    print(f"checkpoint {size / 1e9:.2f} GB, refllm peak RSS {result['peak_rss'] / 1e9:.2f} GB "
          f"(bound {(size + RSS_SLACK) / 1e9:.2f} GB)")
    assert result["peak_rss"] <= size + RSS_SLACK

    model = hf_model(d, torch.float32)
    with torch.no_grad():
        generated = model.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                                   max_new_tokens=NEW_TOKENS, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    theirs = torch.cat(generated.logits).float().numpy()  # [NEW_TOKENS, V]
    tokens = generated.sequences[0, len(PROMPT):].tolist()
    scale = np.abs(theirs).max()
    print(f"max |Δlogit| {np.abs(ours - theirs).max():.3g} of max |logit| {scale:.3g}")
    assert result["tokens"] == tokens
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * scale)
