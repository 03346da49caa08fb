"""The plain reference path (refllm.reference) as the second opinion on the fast path.

- The fast path against the reference, same weights: `refllm.Llama.__call__`,
  `Llama.decode` with its cache, `Llama.decode_batch`, and `refllm.Bert`, on the tiny random configs (MHA,
  GQA, tied and untied heads, an odd head_dim, linear and llama3 RoPE; BERT's odd
  sizes and GELU spellings): max |difference| <= 1e-10 in float64, <= 1e-4 in float32.
- The reference against transformers on the same tiny configs, and on the Llama-family
  variants it reads beyond refllm.Llama: attention_bias, mlp_bias, an explicit
  head_dim (LlamaForCausalLM), Qwen2's q/k/v biases, Mistral.
- Real models (slow): 128 greedy tokens of SmolLM2 identical on both paths; MiniLM's
  hidden states; the float64 golden set's logits (`top`, `logit`) and spec-profile
  embeddings recomputed by the reference.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest

import refllm
from refllm import reference
from tests.llama_util import TINY_CONFIGS, hf_logits, make_tiny_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = {np.float32: 1e-4, np.float64: 1e-10}  # max |difference|, fast path vs reference (issue 15)
DTYPES = [np.float32, np.float64]


def max_diff(a, b) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny_llama(request, tmp_path_factory):
    name = request.param
    return name, make_tiny_llama(tmp_path_factory.mktemp(name), TINY_CONFIGS[name], seed=sorted(TINY_CONFIGS).index(name))


# ------------------------------------------------------------------ the reference is independent

def test_the_reference_shares_no_code_with_the_fast_path():
    """It imports refllm's config and safetensors reader, its own two models, NumPy,
    scipy and the standard library; nothing of refllm.ops, refllm.llama or refllm.bert."""
    allowed = {0: {"__future__", "math", "dataclasses", "pathlib", "numpy", "scipy.special"},
               1: {"bert", "llama"},  # refllm.reference.*
               2: {"checkpoint", "config"}}  # refllm.*
    for path in Path(reference.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module in allowed[node.level], f"{path.name}: from {'.' * node.level}{node.module} import"
            elif isinstance(node, ast.Import):
                assert {a.name for a in node.names} <= allowed[0], f"{path.name}: import {[a.name for a in node.names]}"


def code_lines(path: Path) -> int:
    """Lines of code: not blank, not a comment, not a docstring."""
    source = path.read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(1 for n, line in enumerate(source.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and n not in docstrings)


def test_each_model_is_well_under_200_lines():
    for name in ("llama.py", "bert.py"):
        n = code_lines(Path(reference.__file__).parent / name)
        print(f"refllm/reference/{name}: {n} lines of code")
        assert n < 150, name


# ------------------------------------------------------------------ Llama: fast path vs reference

@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_llama_forward_matches_the_reference(tiny_llama, dtype):
    name, d = tiny_llama
    V = TINY_CONFIGS[name]["vocab_size"]
    ids = list(np.random.default_rng(1).integers(0, V, size=40))
    fast, ref = refllm.Llama.from_pretrained(d, dtype=dtype)(ids), reference.Llama.from_pretrained(d, dtype=dtype)(ids)
    assert ref.shape == (len(ids), V) and ref.dtype == dtype
    err = max_diff(fast, ref)
    print(f"{name} {np.dtype(dtype).name}: max |dlogit| fast vs reference = {err:.3g}")
    assert err <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_llama_cached_decoding_matches_the_reference(tiny_llama, dtype):
    """Prefill in two chunks, then Llama.decode token by token (the path generation
    takes), against the reference's own cache doing the same; and the reference's
    cached logits against its full recomputation."""
    name, d = tiny_llama
    ids = list(np.random.default_rng(2).integers(0, TINY_CONFIGS[name]["vocab_size"], size=24))
    fast, ref = refllm.Llama.from_pretrained(d, dtype=dtype), reference.Llama.from_pretrained(d, dtype=dtype)
    fc, rc = fast.new_cache(32), ref.new_cache(32)
    assert isinstance(rc.k, list) and len(rc.k) == TINY_CONFIGS[name]["num_hidden_layers"]
    worst = max(max_diff(fast(ids[:5], fc), ref(ids[:5], rc)),
                max_diff(fast(ids[5:9], fc, last_only=True), ref(ids[5:9], rc, last_only=True)))
    steps = []
    for t in ids[9:]:
        a, b = fast.decode(t, fc), ref.decode(t, rc)  # [V] x2
        worst = max(worst, max_diff(a, b))
        steps.append(b)
    assert fc.pos == rc.pos == len(ids) and rc.k[0].shape[1] == len(ids)
    print(f"{name} {np.dtype(dtype).name}: max |dlogit| decode vs reference = {worst:.3g}")
    assert worst <= TOL[dtype]
    full = ref(ids)  # [T, V], no cache
    assert max_diff(np.stack(steps), full[9:]) <= TOL[dtype] / 10
    with pytest.raises(ValueError, match="KV cache full"):
        ref(ids[:9], rc)


@pytest.mark.parametrize("mode", ["invariant", "throughput"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_llama_decode_batch_matches_the_reference(tiny_llama, dtype, mode):
    """Llama.decode_batch (continuous batching): four sequences at different positions
    (the throughput mode's smallest gemm batch), stepped together, against the reference
    decoding each alone."""
    name, d = tiny_llama
    V = TINY_CONFIGS[name]["vocab_size"]
    fast, ref = refllm.Llama.from_pretrained(d, dtype=dtype), reference.Llama.from_pretrained(d, dtype=dtype)
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(0, V, size=n)) for n in (3, 9, 1, 6)]
    assert len(prompts) >= refllm.Llama.THROUGHPUT_MIN_BATCH
    fcs, rcs = [fast.new_cache(32) for _ in prompts], [ref.new_cache(32) for _ in prompts]
    for p, fc, rc in zip(prompts, fcs, rcs):
        fast(p, fc), ref(p, rc)
    worst = 0.0
    for _ in range(6):
        tokens = [int(t) for t in rng.integers(0, V, size=len(prompts))]
        batch = fast.decode_batch(tokens, fcs, mode=mode)  # [B, V]
        alone = np.stack([ref.decode(t, rc) for t, rc in zip(tokens, rcs)])  # [B, V]
        worst = max(worst, max_diff(batch, alone))
    print(f"{name} {np.dtype(dtype).name} {mode}: max |dlogit| decode_batch vs reference = {worst:.3g}")
    assert worst <= TOL[dtype]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generation_runs_on_the_reference(tmp_path, temperature):
    """`refllm.generate.Generation` takes the reference model in place of the fast one
    (a learner can step through generation in it): the same tokens, greedy and sampled."""
    import dataclasses

    from refllm.generate import Generation, LoadedLLM
    from refllm.types import InferencingParams
    from tests.tiny_models import make_tiny_llm

    d = make_tiny_llm(tmp_path)
    fast = LoadedLLM.from_dir(d)
    plain = dataclasses.replace(fast, model=reference.Llama.from_pretrained(d))
    params = InferencingParams(max_tokens=40, temperature=temperature, repeat_penalty=1.1)
    a, b = (Generation(llm, "The quick brown fox", params, seed=3) for llm in (fast, plain))
    assert a.run().text == b.run().text and a.tokens == b.tokens
    assert len(a.tokens) == 40  # no early EOS on this tiny model: every step compared


def test_llama_rope_frequencies_match_the_fast_path(tiny_llama):
    from refllm.ops import rope_inv_freq

    name, d = tiny_llama
    c = reference.Llama.from_pretrained(d).config
    np.testing.assert_allclose(reference.llama.rope_inv_freq(c), rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling),
                               rtol=1e-15, atol=0)


# ------------------------------------------------------------------ Llama: reference vs transformers

@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_llama_reference_matches_transformers(tiny_llama, dtype):
    name, d = tiny_llama
    ids = list(np.random.default_rng(1).integers(0, TINY_CONFIGS[name]["vocab_size"], size=40))
    ours = reference.Llama.from_pretrained(d, dtype=dtype)(ids)
    theirs = hf_logits(d, ids, torch.float32 if dtype == np.float32 else torch.float64)
    err = max_diff(ours, theirs)
    print(f"{name} {np.dtype(dtype).name}: max |dlogit| reference vs transformers = {err:.3g}")
    assert err <= TOL[dtype]


def test_llama3_frequencies_match_transformers():
    """The one place where transformers' float32 numbers are the check: its llama3 and
    linear inverse frequencies (modeling_rope_utils.py), against the reference's."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for name in ("llama3_rope", "linear_rope"):
        cfg = dict(TINY_CONFIGS[name])
        hf_config = transformers.LlamaConfig(**cfg)
        kind = cfg["rope_scaling"]["rope_type"]
        theirs, _ = ROPE_INIT_FUNCTIONS[kind](hf_config, "cpu")
        c = refllm.config.LlamaConfig.from_dict(cfg)
        np.testing.assert_allclose(reference.llama.rope_inv_freq(c), theirs.double().numpy(), rtol=1e-6)


FAMILIES = {  # Llama-family checkpoints the reference reads, built by transformers with random weights
    "llama-biases-head_dim": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=83, hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=71, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        vocab_size=67, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, sliding_window=4096, tie_word_embeddings=False)),
}


def make_family_model(d: Path, family: str, seed: int = 0):
    """A transformers model of `family` with every parameter random (biases too:
    transformers initialises them to zero), saved as safetensors; the model itself."""
    config_cls, model_cls, cfg = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**cfg, max_position_embeddings=128))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_(1 + 0.1 * r if name.endswith("norm.weight") else r * (0.2 if p.ndim == 1 else 1 / math.sqrt(p.shape[-1])))
    model.save_pretrained(d)
    return model.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_llama_family_variants_match_transformers(tmp_path, family):
    """Biases, an explicit head_dim, Qwen2 and Mistral: the reference against transformers
    in float32 (eager attention) and in float64 (SDPA, RMSNorm and RoPE angles in
    float64, as tests.llama_util.hf_model does for Llama)."""
    model = make_family_model(tmp_path, family)
    cfg = FAMILIES[family][2]
    from safetensors.numpy import load_file

    if family != "mistral":  # the biases are really there, and read
        assert "model.layers.0.self_attn.q_proj.bias" in load_file(str(tmp_path / "model.safetensors"))
    ids = list(np.random.default_rng(4).integers(0, cfg["vocab_size"], size=33))
    for dtype, tdtype in ((np.float32, torch.float32), (np.float64, torch.float64)):
        ours = reference.Llama.from_pretrained(tmp_path, dtype=dtype)(ids)
        theirs = _hf_logits(model, ids, tdtype, reference.llama.rope_inv_freq(reference.Llama.from_pretrained(tmp_path).config))
        err = max_diff(ours, theirs)
        print(f"{family} {np.dtype(dtype).name}: max |dlogit| reference vs transformers = {err:.3g}")
        assert err <= TOL[dtype]


def _hf_logits(model, ids, tdtype, inv_freq):  # [T] -> [T, V]
    import copy

    m = copy.deepcopy(model).to(tdtype)
    if tdtype == torch.float64:
        m.config._attn_implementation = "sdpa"
        for module in m.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.forward = (lambda n: lambda x: n.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + n.variance_epsilon)))(module)
        inv64 = torch.tensor(inv_freq, dtype=torch.float64)

        def rotary(x, position_ids):
            angles = position_ids[:, :, None].to(torch.float64) * inv64[None, None, :]
            emb = torch.cat([angles, angles], dim=-1)
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

        m.model.rotary_emb.forward = rotary
    else:
        m.config._attn_implementation = "eager"
    with torch.no_grad():
        return m(torch.tensor([list(ids)])).logits[0].numpy()


def test_llama_strict_loading(tmp_path):
    from safetensors.numpy import load_file, save_file

    src = make_tiny_llama(tmp_path / "ok", TINY_CONFIGS["mha"])
    good = load_file(str(src / "model.safetensors"))
    for case, tensors, named in [
        ("missing", {k: v for k, v in good.items() if k != "model.layers.1.mlp.up_proj.weight"}, "model.layers.1.mlp.up_proj.weight"),
        ("extra", {**good, "model.layers.0.self_attn.q_proj.bias": np.ones(32, np.float32)}, "q_proj.bias"),
        ("shape", {**good, "model.norm.weight": np.ones(7, np.float32)}, "model.norm.weight"),
    ]:
        d = tmp_path / case
        d.mkdir()
        (d / "config.json").write_text((src / "config.json").read_text())
        save_file(tensors, str(d / "model.safetensors"))
        with pytest.raises(refllm.LLMRuntimeError, match=named.replace(".", r"\.")):
            reference.Llama.from_pretrained(d)


# ------------------------------------------------------------------ BERT

from tests.test_bert import CONFIGS as BERT_CONFIGS  # noqa: E402
from tests.test_bert import hf_forward, hf_model, padded_batch, random_state_dict, write_model  # noqa: E402


@pytest.fixture(scope="module", params=list(BERT_CONFIGS))
def tiny_bert(request, tmp_path_factory):
    name = request.param
    cfg = BERT_CONFIGS[name]
    sd = random_state_dict(cfg, list(BERT_CONFIGS).index(name))
    return name, cfg, sd, write_model(tmp_path_factory.mktemp(name), cfg, sd)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_bert_matches_the_reference(tiny_bert, dtype):
    """refllm.Bert against the reference on a padded batch, real tokens (refllm.Bert
    returns zeros at padded positions, the reference computes them as transformers)."""
    name, cfg, sd, d = tiny_bert
    ids, mask, types = padded_batch(cfg, seed=len(name))
    fast = refllm.Bert.from_pretrained(d, dtype=dtype)(ids, mask, types)  # [B, T, H]
    ref = reference.Bert.from_pretrained(d, dtype=dtype)(ids, mask, types)  # [B, T, H]
    err = max_diff(fast[mask > 0], ref[mask > 0])
    print(f"{name} {np.dtype(dtype).name}: max |dh| fast vs reference on real tokens = {err:.3g}")
    assert err <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_bert_reference_matches_transformers(tiny_bert, dtype):
    """Every position, padded ones included: the reference computes what transformers does."""
    name, cfg, sd, d = tiny_bert
    ids, mask, types = padded_batch(cfg, seed=len(name))
    ours = reference.Bert.from_pretrained(d, dtype=dtype)(ids, mask, types)  # [B, T, H]
    theirs = hf_forward(hf_model(cfg, sd, torch.float32 if dtype == np.float32 else torch.float64), ids, mask, types)
    err = max_diff(ours, theirs.astype(dtype))
    print(f"{name} {np.dtype(dtype).name}: max |dh| reference vs transformers = {err:.3g}")
    assert err <= (1e-5 if dtype == np.float32 else 1e-10)


# ------------------------------------------------------------------ real models (slow)

@pytest.mark.slow
def test_smollm2_greedy_128_tokens_identical(llama_dir):
    """Prefill then 128 greedy decode steps on each path, float32: the same tokens."""
    from tokenizers import Tokenizer

    prompt = "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    ids = Tokenizer.from_file(str(llama_dir / "tokenizer.json")).encode(prompt).ids
    worst = 0.0
    fast, ref = refllm.Llama.from_pretrained(llama_dir), reference.Llama.from_pretrained(llama_dir)
    fc, rc = fast.new_cache(len(ids) + 128), ref.new_cache(len(ids) + 128)
    a, b = fast(ids, fc, last_only=True)[0], ref(ids, rc, last_only=True)[0]  # [V] x2
    fast_tokens, ref_tokens = [], []
    for _ in range(128):
        worst = max(worst, max_diff(a, b))
        fast_tokens.append(int(np.argmax(a)))
        ref_tokens.append(int(np.argmax(b)))
        if fast_tokens[-1] != ref_tokens[-1]:
            break
        a, b = fast.decode(fast_tokens[-1], fc), ref.decode(ref_tokens[-1], rc)
    print(f"smollm2 float32: {len(fast_tokens)} greedy tokens, max |dlogit| fast vs reference = {worst:.3g}")
    assert fast_tokens == ref_tokens and len(fast_tokens) == 128
    assert worst <= 1e-3  # real model, 30 layers, float32 (tests/test_real_llama.py: 1.6e-4 against transformers)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_minilm_matches_the_reference(minilm_dir, dtype):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tok.enable_padding()
    enc = tok.encode_batch(["A short one.", "The quick brown fox jumps over the lazy dog, twice over.", "hi"])
    ids, mask = np.array([e.ids for e in enc]), np.array([e.attention_mask for e in enc])  # [B, T] x2
    fast = refllm.Bert.from_pretrained(minilm_dir, dtype=dtype)(ids, mask)  # [B, T, H]
    ref = reference.Bert.from_pretrained(minilm_dir, dtype=dtype)(ids, mask)  # [B, T, H]
    err = max_diff(fast[mask > 0], ref[mask > 0])
    print(f"all-MiniLM-L6-v2 {np.dtype(dtype).name}: max |dh| fast vs reference = {err:.3g}")
    assert err <= TOL[dtype]


@pytest.fixture(scope="module")
def quick_golden(models_root):
    from refllm.golden import QUICK, builtin_golden_dir, load_golden

    return load_golden(builtin_golden_dir(models_root, QUICK))


@pytest.mark.slow
def test_golden_logits_recomputed_by_the_reference(quick_golden, llama_dir):
    """Every generation case of the quick golden set: the reference, in float64, runs the
    prompt and the generated tokens once, and each step's recorded raw logits (the
    token's `logit` and the 20 `top` ones, written by the fast path in float64) are the
    reference's, to 1e-10. The top ids are the reference's 20 largest logits."""
    model = reference.Llama.from_pretrained(llama_dir, dtype=np.float64)
    cases = [c for c in quick_golden.cases if c["kind"] == "generate" and c["steps"]]
    assert {"greedy", "greedy-repeat-penalty", "chat-eos"} <= {c["name"] for c in cases}
    worst = 0.0
    for c in cases:
        P = len(c["prompt_ids"])
        z = model(c["prompt_ids"] + c["tokens"][:-1])[P - 1 :]  # [steps, V]: row i predicts step i
        for s, row in zip(c["steps"], z):
            ids, logits = zip(*s["top"])
            worst = max(worst, abs(row[s["token"]] - s["logit"]), float(np.max(np.abs(row[list(ids)] - logits))))
            others = np.delete(row, list(ids))  # every logit outside the recorded top 20 is below its last
            assert others.max() <= logits[-1] + 1e-10, c["name"]
    print(f"golden (quick, {len(cases)} generation cases): max |dlogit| reference vs golden = {worst:.3g}")
    assert worst <= 1e-10


@pytest.mark.slow
def test_golden_embeddings_recomputed_by_the_reference(quick_golden, minilm_dir):
    """The spec-profile embeddings of the quick golden set: the reference encoder in
    float64, one text at a time, mean-pooled and L2-normalised (SPEC section 4)."""
    model = reference.Bert.from_pretrained(minilm_dir, dtype=np.float64)
    cases = [c for c in quick_golden.cases if c["kind"] == "embed"]
    assert cases
    worst = 0.0
    for c in cases:
        for ids, expected in zip(c["token_ids"], c["embeddings"]):
            v = model(np.array([ids]))[0].mean(axis=0)  # [H]
            worst = max(worst, float(np.max(np.abs(v / np.linalg.norm(v) - expected))))
    print(f"golden (quick, {len(cases)} embedding cases): max |d| reference vs golden = {worst:.3g}")
    assert worst <= 1e-12
