"""Generation and the Spin-shaped API on a tiny random model with a real tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import refllm
from refllm import engine, sampling
from refllm.errors import InvalidInputError, LLMRuntimeError, ModelNotSupportedError
from refllm.generate import Generation, LoadedLLM
from refllm.types import InferencingParams
from tests.tiny_models import make_tiny_llm

GREEDY = InferencingParams(max_tokens=12, temperature=0.0, repeat_penalty=1.0)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_tiny_llm(root, "tiny")
    make_tiny_llm(root, "tiny-long", context=256)
    return root


@pytest.fixture(scope="module")
def llm(root):
    return engine.get_llm(root / "llama" / "tiny")


def reference_generate(llm: LoadedLLM, prompt_ids, params, seed):
    """The SPEC 2-3 loop with no KV cache: recompute every position for every token."""
    rng = sampling.make_rng(seed)
    ids, out = list(prompt_ids), []
    while len(out) < params.max_tokens:
        logits = llm.model(ids)[-1]
        u = rng.random() if sampling.needs_draw(params) else None
        token = sampling.sample_token(logits, ids, params, u)
        ids.append(token)
        out.append(token)
        if token in llm.eos_token_ids or len(ids) >= llm.context_length:
            break
    return out


@pytest.mark.parametrize("params", [
    GREEDY,
    InferencingParams(max_tokens=20, temperature=0.0, repeat_penalty=1.3, repeat_penalty_last_n_token_count=8),
    InferencingParams(max_tokens=20),  # the WIT defaults
    InferencingParams(max_tokens=20, temperature=1.5, top_k=5, top_p=0.5, repeat_penalty=0.9),
])
def test_generation_equals_uncached_reference(llm, params):
    gen = Generation(llm, "The quick brown fox", params, seed=7)
    result = gen.run()
    assert gen.tokens == reference_generate(llm, gen.prompt_ids, params, seed=7)
    assert result.text == llm.decode(gen.tokens)
    assert result.usage.generated_token_count == len(gen.tokens)


def test_usage_counts_bos_and_prompt(llm, root):
    r = refllm.infer("tiny", "Hello world", GREEDY, models_dir=root)
    ids = llm.tokenizer.encode("Hello world").ids
    assert ids[0] == llm.tokenizer.token_to_id("<s>")
    assert r.usage.prompt_token_count == len(ids)
    assert r.usage.generated_token_count == GREEDY.max_tokens
    assert r.finish_reason == "length"


def test_max_tokens_zero(root):
    r = refllm.infer("tiny", "Hello", InferencingParams(max_tokens=0), models_dir=root)
    assert r.text == "" and r.usage.generated_token_count == 0


def test_stops_at_eos_and_counts_it(llm):
    first = Generation(llm, "Hello", GREEDY, seed=0)
    first.run()
    eos = first.tokens[2]
    stopping = LoadedLLM(**{**llm.__dict__, "eos_token_ids": frozenset({eos})})
    gen = Generation(stopping, "Hello", GREEDY, seed=0)
    r = gen.run()
    assert gen.tokens == first.tokens[: first.tokens.index(eos) + 1]
    assert r.usage.generated_token_count == len(gen.tokens) and r.finish_reason == "eos"


def test_stops_when_context_is_full(root):
    r = refllm.infer("tiny", "Hello world", InferencingParams(max_tokens=500), models_dir=root, seed=1)
    assert r.usage.prompt_token_count + r.usage.generated_token_count == 64
    assert r.finish_reason == "context"


def test_seed_is_reproducible_and_reported(root):
    params = InferencingParams(max_tokens=16, temperature=1.0)
    a = refllm.infer("tiny", "Why is the sky", params, models_dir=root, seed=123)
    b = refllm.infer("tiny", "Why is the sky", params, models_dir=root, seed=123)
    assert a == b and a.seed == 123
    unseeded = refllm.infer("tiny", "Why is the sky", params, models_dir=root)
    assert isinstance(unseeded.seed, int)
    assert refllm.infer("tiny", "Why is the sky", params, models_dir=root, seed=unseeded.seed) == unseeded


def test_seed_is_reproducible_across_processes(root):
    code = ("import refllm, json; r = refllm.infer('tiny', 'Why is the sky', refllm.InferencingParams(max_tokens=16,"
            f" temperature=1.0), models_dir={str(root)!r}, seed=99); print(json.dumps(r.text))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = refllm.infer("tiny", "Why is the sky", InferencingParams(max_tokens=16, temperature=1.0), models_dir=root, seed=99)
    assert json.loads(out) == here.text


@pytest.mark.parametrize("seed", range(8))
def test_stream_pieces_concatenate_to_text(root, seed):
    # A random model over byte-level tokens emits partial UTF-8 all the time: a piece
    # shown before its character was complete would differ from the final decode.
    params = InferencingParams(max_tokens=40, temperature=2.0, top_k=320, top_p=1.0, repeat_penalty=1.0)
    gen = refllm.infer_stream("tiny-long", "你好 🙂", params, models_dir=root, seed=seed)
    pieces = list(gen)
    assert "".join(pieces) == gen.result.text
    assert gen.result == refllm.infer("tiny-long", "你好 🙂", params, models_dir=root, seed=seed)
    assert all(pieces)


def test_stop_strings(llm):
    full = Generation(llm, "Hello", InferencingParams(max_tokens=30, temperature=0), seed=0).run().text
    stop = full[5:8]
    gen = Generation(llm, "Hello", InferencingParams(max_tokens=30, temperature=0), seed=0, stop=[stop, "zzzzzz"])
    pieces = list(gen)
    assert gen.result.text == full[: full.index(stop)]
    assert "".join(pieces) == gen.result.text and gen.result.finish_reason == "stop"
    assert gen.stop_sequence == stop


@pytest.mark.parametrize("params, field", [
    (InferencingParams(temperature=float("nan")), "temperature"),
    (InferencingParams(top_p=float("inf")), "top_p"),
    (InferencingParams(repeat_penalty=float("-inf")), "repeat_penalty"),
    (InferencingParams(repeat_penalty=0.0), "repeat_penalty"),
    (InferencingParams(repeat_penalty=-1.0), "repeat_penalty"),
    (InferencingParams(top_k=0), "top_k"),
    (InferencingParams(max_tokens=-1), "max_tokens"),
    (InferencingParams(max_tokens=2**32), "max_tokens"),
    (InferencingParams(temperature="hot"), "temperature"),
])
def test_invalid_params_name_the_field(root, params, field):
    with pytest.raises(InvalidInputError, match=field) as e:
        refllm.infer("tiny", "Hello", params, models_dir=root)
    assert e.value.variant == "invalid-input"


def test_prompt_longer_than_context(root):
    with pytest.raises(InvalidInputError, match="context of 64"):
        refllm.infer("tiny", "fox " * 100, models_dir=root)


def test_prompt_of_zero_tokens(llm):
    from tokenizers import Tokenizer

    bare = Tokenizer.from_str(llm.tokenizer.to_str())
    bare.post_processor = None  # a model whose tokenizer adds no BOS, like SmolLM2
    nobos = LoadedLLM(**{**llm.__dict__, "tokenizer": bare})
    with pytest.raises(InvalidInputError, match="zero tokens"):
        Generation(nobos, "", GREEDY)


def test_model_errors(root, tmp_path):
    with pytest.raises(InvalidInputError, match="no model directory found in registry for model 'missing'"):
        refllm.infer("missing", "Hello", models_dir=root)
    (tmp_path / "mistral" / "m7").mkdir(parents=True)
    with pytest.raises(ModelNotSupportedError):
        refllm.infer("m7", "Hello", models_dir=tmp_path)
    with pytest.raises(InvalidInputError, match="add 'tiny' to the 'ai_models' key"):
        refllm.infer("tiny", "Hello", models_dir=root, allowed_models=["other"])
    (tmp_path / "llama" / "broken").mkdir(parents=True)
    (tmp_path / "llama" / "broken" / "config.json").write_text("{}")
    with pytest.raises(LLMRuntimeError, match="config.json"):
        refllm.infer("broken", "Hello", models_dir=tmp_path)
    with pytest.raises(InvalidInputError, match="prompt must be a string"):
        refllm.infer("tiny", 42, models_dir=root)
    with pytest.raises(InvalidInputError, match="not valid Unicode"):
        refllm.infer("tiny", "lone \ud800 surrogate", models_dir=root)


def test_models_are_loaded_once(root):
    a = engine.get_llm(root / "llama" / "tiny")
    refllm.infer("tiny", "Hello", GREEDY, models_dir=root)
    assert engine.get_llm(root / "llama" / "tiny") is a


def test_spin_profile_and_infer_with_options(root):
    spec = refllm.infer("tiny", "Hello", GREEDY, models_dir=root)
    spin = refllm.infer("tiny", "Hello", GREEDY, models_dir=root, profile="spin")
    assert spin.text == "Hello" + spec.text
    assert spin.usage.prompt_token_count == spec.usage.prompt_token_count + spec.usage.generated_token_count
    assert refllm.infer_with_options("tiny", "Hello", GREEDY, models_dir=root) == spec


def test_chat_template(llm):
    prompt = llm.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(InvalidInputError):
        llm.apply_chat_template([{"content": "no role"}])


def test_float64_generation_matches_float32_greedy(root):
    a = refllm.infer("tiny", "Hello", GREEDY, models_dir=root)
    b = refllm.infer("tiny", "Hello", GREEDY, models_dir=root, precision="float64")
    assert engine.get_llm(root / "llama" / "tiny", precision="float64").model.dtype == np.float64
    assert a.text == b.text
