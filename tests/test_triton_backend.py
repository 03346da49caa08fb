"""The triton backend against the numpy backend, whole models.

- Tiny random Llamas (every config of `tests.llama_util.TINY_CONFIGS`: MHA, GQA with tied
  embeddings, a head dim of 10, llama3 and linear RoPE scaling) and tiny random BERTs
  (erf and tanh GELU, padded batches): max |Δ| <= 1e-4 in float32, on every position,
  for a whole sequence and for cached decoding (a prefill, a chunk on top of the cache,
  then one token at a time).
- On CUDA only (`-m gpu`, skipped otherwise with the reason): the real default models,
  SmolLM2-135M's greedy tokens identical for 128 tokens on both backends, and
  all-MiniLM-L6-v2's hidden states.

Without CUDA the kernels run under Triton's interpreter (`TRITON_INTERPRET=1`, set here
before triton is imported); without torch or triton the module skips with the reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the triton backend runs on torch tensors")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton and the kernels are imported
pytest.importorskip("triton", reason="triton is not installed: no CUDA and no interpreter to run the kernels")

import refllm.bert  # noqa: E402
import refllm.kernels  # noqa: E402
from refllm.bert import Bert  # noqa: E402
from refllm.bert_triton import TritonBert  # noqa: E402
from refllm.errors import LLMRuntimeError  # noqa: E402
from refllm.llama import Llama  # noqa: E402
from refllm.llama_triton import TritonLlama  # noqa: E402
from tests.llama_util import TINY_CONFIGS, make_tiny_llama  # noqa: E402

if not (torch.cuda.is_available() or refllm.kernels.INTERPRET):
    pytest.skip("no CUDA device and TRITON_INTERPRET=0: nowhere to run the kernels", allow_module_level=True)

TOL = 1e-4  # float32, max |Δ| of logits / hidden states
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the real models on the GPU)")


pytestmark = pytest.mark.usefixtures("one_blas_thread")


def max_diff(name: str, a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, f"{name}: shapes {a.shape} and {b.shape}"
    assert np.isfinite(a).all(), f"{name}: {int(np.isnan(a).sum())} NaN, {int(np.isinf(a).sum())} Inf"
    d = float(np.max(np.abs(a.astype(np.float64) - b)))
    print(f"{name}: max |Δ| = {d:.3g}")
    return d


# ------------------------------------------------------------------------------ Llama

@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny_llama(request, tmp_path_factory):
    name = request.param
    model_dir = make_tiny_llama(tmp_path_factory.mktemp(name), TINY_CONFIGS[name], seed=len(name))
    return name, Llama.from_pretrained(model_dir, backend="numpy"), Llama.from_pretrained(model_dir, backend="triton")


def test_tiny_llama_whole_sequence(tiny_llama):
    name, ref, tri = tiny_llama
    assert isinstance(tri, TritonLlama) and tri.backend == "triton" and tri.config == ref.config
    ids = np.random.default_rng(1).integers(0, ref.config.vocab_size, size=40)
    got = tri(ids)
    assert got.dtype == np.float32 and got.shape == (40, ref.config.vocab_size)
    assert max_diff(f"{name} logits [40]", got, ref(ids)) <= TOL


def test_tiny_llama_cached_decoding(tiny_llama):
    """Prefill 9 tokens, a chunk of 6 on top of the cache, then 3 tokens one at a time:
    each step's logits match the numpy backend's (with its own cache) and the whole-
    sequence recomputation; then two more through `decode`."""
    name, ref, tri = tiny_llama
    ids = np.random.default_rng(2).integers(0, ref.config.vocab_size, size=18)
    full = ref(ids)  # [18, V]
    c_ref, c_tri = ref.new_cache(32), tri.new_cache(32)
    for a, b in [(0, 9), (9, 15), (15, 16), (16, 17), (17, 18)]:
        got = tri(ids[a:b], c_tri, last_only=(b - a == 1))
        want = ref(ids[a:b], c_ref, last_only=(b - a == 1))
        assert c_tri.pos == c_ref.pos == b
        assert max_diff(f"{name} cached [{a}:{b}]", got, want) <= TOL
        assert max_diff(f"{name} cached [{a}:{b}] vs full", got, full[b - got.shape[0] : b]) <= TOL
    for t in (5, 7):  # the one-token step generation takes (decode): the same on both backends
        got, want = tri.decode(t, c_tri), ref.decode(t, c_ref)  # [V] x2
        assert got.shape == want.shape == (ref.config.vocab_size,) and c_tri.pos == c_ref.pos
        assert max_diff(f"{name} decode({t})", got, want) <= TOL


def test_triton_llama_surface(tmp_path):
    model_dir = make_tiny_llama(tmp_path / "m", TINY_CONFIGS["gqa_tied"])
    tri = TritonLlama.from_pretrained(model_dir)
    assert tri.dtype == np.float32 and tri.lm_head is tri.embed_tokens  # tied: one tensor
    with pytest.raises(ValueError, match="float32"):
        TritonLlama.from_pretrained(model_dir, dtype=np.float64)
    with pytest.raises(ValueError, match="out of range"):
        tri([0, 101])
    with pytest.raises(ValueError, match="no tokens"):
        tri([])
    cache = tri.new_cache(4)
    tri([1, 2, 3], cache)
    with pytest.raises(ValueError, match="KV cache full"):
        tri([4, 5], cache)
    assert cache.pos == 3


def test_triton_llama_loads_as_strictly_as_numpy(tmp_path):
    from safetensors.numpy import load_file, save_file

    model_dir = make_tiny_llama(tmp_path / "m", TINY_CONFIGS["mha"])
    tensors = load_file(str(model_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(LLMRuntimeError, match="up_proj"):
        Llama.from_pretrained(model_dir, backend="triton")


# ------------------------------------------------------------------------------ BERT

BERT_CONFIGS = {
    "h30-nh5-l2-gelu": dict(vocab_size=53, hidden_size=30, num_attention_heads=5, num_hidden_layers=2,
                            intermediate_size=47, max_position_embeddings=24, type_vocab_size=2, hidden_act="gelu"),
    "h16-nh1-l1-gelu_new": dict(vocab_size=37, hidden_size=16, num_attention_heads=1, num_hidden_layers=1,
                                intermediate_size=33, max_position_embeddings=19, type_vocab_size=1,
                                hidden_act="gelu_new", layer_norm_eps=1e-5),
    "h64-nh4-l2-gelu": dict(vocab_size=90, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                            intermediate_size=100, max_position_embeddings=40, type_vocab_size=2, hidden_act="gelu"),
}


def make_tiny_bert(d: Path, cfg: dict, seed: int) -> Path:
    """config.json and random BertModel weights (names as transformers saves them)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    H, F = cfg["hidden_size"], cfg["intermediate_size"]

    def r(*shape, offset=0.0):
        return (offset + 0.3 * rng.standard_normal(shape)).astype(np.float32)

    t = {"embeddings.word_embeddings.weight": r(cfg["vocab_size"], H),
         "embeddings.position_embeddings.weight": r(cfg["max_position_embeddings"], H),
         "embeddings.token_type_embeddings.weight": r(cfg["type_vocab_size"], H),
         "embeddings.LayerNorm.weight": r(H, offset=1.0), "embeddings.LayerNorm.bias": r(H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name, (n_out, n_in) in {"attention.self.query": (H, H), "attention.self.key": (H, H),
                                    "attention.self.value": (H, H), "attention.output.dense": (H, H),
                                    "intermediate.dense": (F, H), "output.dense": (H, F)}.items():
            t[p + name + ".weight"], t[p + name + ".bias"] = r(n_out, n_in), r(n_out)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + name + ".weight"], t[p + name + ".bias"] = r(H, offset=1.0), r(H)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "bert", **cfg}))
    save_file(t, str(d / "model.safetensors"))
    return d


def padded_batch(cfg: dict, seed: int):
    """Three texts of lengths T, T - 4 and 1, padded on the right with id 0."""
    rng = np.random.default_rng(seed)
    T = cfg["max_position_embeddings"] - 1
    mask = (np.arange(T)[None, :] < np.array([T, T - 4, 1])[:, None]).astype(np.int64)  # [B, T]
    ids = np.where(mask > 0, rng.integers(1, cfg["vocab_size"], size=(3, T)), 0)  # [B, T]
    types = np.where(mask > 0, rng.integers(0, cfg["type_vocab_size"], size=(3, T)), 0)  # [B, T]
    return ids, mask, types


@pytest.mark.parametrize("name", sorted(BERT_CONFIGS))
def test_tiny_bert(tmp_path, name):
    cfg = BERT_CONFIGS[name]
    model_dir = make_tiny_bert(tmp_path / name, cfg, seed=len(name))
    ref, tri = Bert.from_pretrained(model_dir, backend="numpy"), TritonBert.from_pretrained(model_dir)
    assert tri.backend == "triton" and tri.config == ref.config and tri.dtype == np.float32
    ids, mask, types = padded_batch(cfg, seed=1)
    got = tri(ids, mask, types)
    assert got.dtype == np.float32 and got.shape == (3, ids.shape[1], cfg["hidden_size"])
    assert max_diff(f"bert {name} padded batch", got, ref(ids, mask, types)) <= TOL
    # Spin's profile: the tanh GELU on the same weights, no mask.
    assert max_diff(f"bert {name} tanh gelu", tri.with_hidden_act("gelu_new")(ids),
                    ref.with_hidden_act("gelu_new")(ids)) <= TOL
    # A batch of one short text (the split-K matmul path: B T <= 16 rows).
    assert max_diff(f"bert {name} one text", tri(ids[1:2, :5]), ref(ids[1:2, :5])) <= TOL


def test_triton_bert_surface(tmp_path):
    model_dir = make_tiny_bert(tmp_path / "b", BERT_CONFIGS["h30-nh5-l2-gelu"], seed=0)
    tri = TritonBert.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="float32"):
        TritonBert.from_pretrained(model_dir, dtype=np.float64)
    from refllm.errors import InvalidInputError

    with pytest.raises(InvalidInputError):  # Bert's own input checks
        tri([[1, 2, 99]])


def test_bert_from_pretrained_dispatches_to_triton(tmp_path):
    if "triton" not in getattr(refllm.bert, "BACKENDS", ()):
        pytest.skip("refllm/bert.py has no triton hook yet (Bert.from_pretrained(..., backend='triton'))")
    model_dir = make_tiny_bert(tmp_path / "b", BERT_CONFIGS["h30-nh5-l2-gelu"], seed=0)
    assert isinstance(Bert.from_pretrained(model_dir, backend="triton"), TritonBert)


# ------------------------------------------------------------------------------ real models, CUDA

def greedy(model, ids, n: int) -> list[int]:
    """n tokens by argmax with a KV cache (EOS ignored, so all n are compared)."""
    cache = model.new_cache(len(ids) + n)
    logits = model(ids, cache, last_only=True)[0]
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = model([out[-1]], cache, last_only=True)[0]
    return out


@pytest.mark.gpu
@pytest.mark.slow
@CUDA
def test_real_llama_greedy_128_tokens(llama_dir):
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(Path(llama_dir) / "tokenizer.json")).encode("Why is the sky blue?").ids
    ref, tri = Llama.from_pretrained(llama_dir, backend="numpy"), Llama.from_pretrained(llama_dir, backend="triton")
    assert max_diff("smollm2 prompt logits", tri(ids), ref(ids)) <= 1e-3
    want, got = greedy(ref, ids, 128), greedy(tri, ids, 128)
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    assert got == want, f"greedy tokens differ from token {first} on: {got[first:first + 8]} vs {want[first:first + 8]}"


@pytest.mark.gpu
@pytest.mark.slow
@CUDA
def test_real_minilm_hidden_states(minilm_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(minilm_dir) / "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    enc = tok.encode_batch(["Why is the sky blue?", "Rayleigh scattering", "a much longer sentence " * 8])
    ids = np.array([e.ids for e in enc])
    mask = np.array([e.attention_mask for e in enc])
    ref, tri = Bert.from_pretrained(minilm_dir, backend="numpy"), TritonBert.from_pretrained(minilm_dir)
    assert max_diff("minilm hidden states", tri(ids, mask), ref(ids, mask)) <= TOL
