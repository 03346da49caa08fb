"""The NumPy Llama against transformers' LlamaForCausalLM with the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

from refllm.errors import LLMRuntimeError
from refllm.llama import Llama
from tests.llama_util import TINY_CONFIGS, hf_logits, make_tiny_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_tiny_llama_matches_transformers(tmp_path, name, precision):
    model_dir = make_tiny_llama(tmp_path / name, TINY_CONFIGS[name], seed=sorted(TINY_CONFIGS).index(name))
    V = TINY_CONFIGS[name]["vocab_size"]
    ids = list(np.random.default_rng(1).integers(0, V, size=40))
    dtype, tol = (np.float32, 1e-4) if precision == "float32" else (np.float64, 1e-10)
    ours = Llama.from_pretrained(model_dir, dtype=dtype)(ids)
    theirs = hf_logits(model_dir, ids, torch.float32 if precision == "float32" else torch.float64)
    assert ours.dtype == dtype and ours.shape == (len(ids), V)
    err = np.max(np.abs(ours - theirs))
    print(f"{name} {precision}: max |dlogit| = {err:.3g}")
    assert err <= tol


@pytest.mark.parametrize("name", ["gqa_tied", "llama3_rope"])
def test_cached_decoding_equals_full_recomputation(tmp_path, name):
    model = Llama.from_pretrained(make_tiny_llama(tmp_path / name, TINY_CONFIGS[name]))
    ids = list(np.random.default_rng(2).integers(0, TINY_CONFIGS[name]["vocab_size"], size=30))
    full = model(ids)  # [T, V]
    cache = model.new_cache(64)
    pieces = [model(ids[:11], cache)]  # prefill 11, then chunks of 1 and 3
    pos = 11
    while pos < len(ids):
        n = 1 if pos % 2 else 3
        pieces.append(model(ids[pos : pos + n], cache))
        pos += n
    stepwise = np.concatenate(pieces)
    assert cache.pos == len(ids)
    np.testing.assert_allclose(stepwise, full, rtol=1e-5, atol=1e-5)
    last = model(ids, model.new_cache(64), last_only=True)
    np.testing.assert_allclose(last, full[-1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_token_decode_equals_the_forward_pass(tmp_path, name, dtype):
    """Llama.decode, the one-token path generation takes, against __call__ on the same
    cache contents, token after token (float64: equal up to summation order)."""
    model = Llama.from_pretrained(make_tiny_llama(tmp_path / name, TINY_CONFIGS[name]), dtype=dtype)
    ids = list(np.random.default_rng(3).integers(0, TINY_CONFIGS[name]["vocab_size"], size=20))
    a, b = model.new_cache(64), model.new_cache(64)
    model(ids[:7], a), model(ids[:7], b)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for t in ids[7:]:
        fast, ref = model.decode(t, a), model([t], b, last_only=True)[0]  # [V] x2
        assert fast.shape == ref.shape and fast.dtype == ref.dtype == dtype
        np.testing.assert_allclose(fast, ref, rtol=tol, atol=tol)
    assert a.pos == b.pos == len(ids)
    np.testing.assert_allclose(a.k[..., : a.pos, :], b.k[..., : b.pos, :], rtol=tol, atol=tol)  # [L, NKV, S, HD]
    with pytest.raises(ValueError, match="token id out of range"):
        model.decode(TINY_CONFIGS[name]["vocab_size"], a)


def test_half_precision_checkpoints_load(tmp_path):
    src = make_tiny_llama(tmp_path / "f32", TINY_CONFIGS["mha"])
    ref = Llama.from_pretrained(src)
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in _read(src).items()}
    from safetensors.torch import save_file

    for tdtype in (torch.float16, torch.bfloat16):
        d = tmp_path / str(tdtype)
        d.mkdir()
        (d / "config.json").write_text((src / "config.json").read_text())
        save_file({k: v.to(tdtype) for k, v in tensors.items()}, str(d / "model.safetensors"))
        model = Llama.from_pretrained(d)
        expect = tensors["model.layers.0.self_attn.q_proj.weight"].to(tdtype).to(torch.float32).numpy()
        np.testing.assert_array_equal(model.layers[0].q_proj, expect)
        assert model.layers[0].q_proj.dtype == np.float32
        assert np.max(np.abs(model([1, 2, 3]) - ref([1, 2, 3]))) < 0.1


def _read(d):
    from safetensors.numpy import load_file

    return load_file(str(d / "model.safetensors"))


def test_sharded_checkpoint_loads(tmp_path):
    from safetensors.numpy import save_file

    src = make_tiny_llama(tmp_path / "one", TINY_CONFIGS["mha"])
    tensors = _read(src)
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(d / shard))
    index = {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    np.testing.assert_array_equal(Llama.from_pretrained(d)([5, 6, 7]), Llama.from_pretrained(src)([5, 6, 7]))


def test_strict_loading_names_the_problem(tmp_path):
    from safetensors.numpy import save_file

    src = make_tiny_llama(tmp_path / "ok", TINY_CONFIGS["mha"])
    good = _read(src)
    cases = {
        "missing": ({k: v for k, v in good.items() if k != "model.layers.1.mlp.up_proj.weight"}, "model.layers.1.mlp.up_proj.weight"),
        "shape": ({**good, "model.norm.weight": np.ones(7, np.float32)}, "model.norm.weight"),
        "extra": ({**good, "model.layers.9.mystery.weight": np.ones(3, np.float32)}, "model.layers.9.mystery.weight"),
    }
    for case, (tensors, named) in cases.items():
        d = tmp_path / case
        d.mkdir()
        (d / "config.json").write_text((src / "config.json").read_text())
        save_file(tensors, str(d / "model.safetensors"))
        with pytest.raises(LLMRuntimeError, match=named.replace(".", r"\.")):
            Llama.from_pretrained(d)
    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(LLMRuntimeError, match="config.json"):
        Llama.from_pretrained(bad)


def test_transformers5_rope_parameters(tmp_path):
    src = make_tiny_llama(tmp_path / "a", TINY_CONFIGS["linear_rope"])
    cfg = json.loads((src / "config.json").read_text())
    rope = {"rope_theta": cfg.pop("rope_theta"), **cfg.pop("rope_scaling")}
    cfg["rope_parameters"] = rope
    (src / "config.json").write_text(json.dumps(cfg))
    model = Llama.from_pretrained(src)
    assert model.config.rope_theta == rope["rope_theta"]
    assert model.config.rope_scaling["rope_type"] == "linear"
