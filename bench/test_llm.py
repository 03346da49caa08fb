"""Prefill (a 128-token prompt) and decode (128 greedy tokens, batch 1) tokens/s of the
SmolLM2-135M decoder, float32: refllm, llama.cpp (F32 GGUF), transformers."""

from __future__ import annotations

import pytest

from refllm import bench

from .conftest import engine, record

LLM_ENGINES = [bench.REFLLM, bench.LLAMA_CPP, bench.TRANSFORMERS]


def load(name, llama_dir):
    return engine("llm", name, lambda: bench.LLM_FACTORIES[name](llama_dir, bench.n_threads()))


@pytest.fixture(scope="module")
def ids(llama_dir):
    return bench.prompt_ids(llama_dir)


@pytest.mark.parametrize("name", LLM_ENGINES)
def test_prefill(benchmark, llama_dir, ids, rounds, name):
    e = load(name, llama_dir)
    benchmark.group = f"prefill {bench.PROMPT_TOKENS} tokens"
    benchmark.pedantic(e.prefill, args=(ids,), rounds=rounds, warmup_rounds=1, iterations=1)
    record("prefill", name, bench.PROMPT_TOKENS, "tok/s", benchmark)


@pytest.mark.parametrize("name", LLM_ENGINES)
def test_decode(benchmark, llama_dir, ids, rounds, name):
    e = load(name, llama_dir)
    benchmark.group = f"decode {bench.DECODE_TOKENS} tokens, batch 1"

    def steps(token):
        for _ in range(bench.DECODE_TOKENS):
            token = e.step(token)

    benchmark.pedantic(steps, setup=lambda: ((e.prefill(ids),), {}), rounds=rounds, warmup_rounds=1, iterations=1)
    record("decode", name, bench.DECODE_TOKENS, "tok/s", benchmark)


def test_engines_agree_on_greedy_tokens(llama_dir, ids):
    """Sanity: the engines decode the same weights (the first greedy tokens match refllm's)."""
    ours = bench.greedy_tokens(load(bench.REFLLM, llama_dir), ids, 8)
    for name in LLM_ENGINES[1:]:
        try:
            peer = load(name, llama_dir)
        except pytest.skip.Exception:
            continue
        assert bench.greedy_tokens(peer, ids, 8)[:4] == ours[:4], name
