"""Sentences/s of all-MiniLM-L6-v2 on 32 short sentences, one at a time and 32 at a
time (four passes a timed round): refllm against sentence-transformers on the same
model directory."""

from __future__ import annotations

import numpy as np
import pytest

from refllm import bench

from .conftest import engine, record

EMBED_ENGINES = [bench.REFLLM, bench.SENTENCE_TRANSFORMERS]


def load(name, minilm_dir):
    return engine("embed", name, lambda: bench.EMBED_FACTORIES[name](minilm_dir, bench.n_threads()))


@pytest.mark.parametrize("batch", [1, bench.EMBED_BATCH])
@pytest.mark.parametrize("name", EMBED_ENGINES)
def test_embed(benchmark, minilm_dir, rounds, name, batch):
    e = load(name, minilm_dir)
    benchmark.group = f"embeddings, batch {batch}"
    benchmark.pedantic(bench.time_embed, args=(e, bench.SENTENCES, batch), rounds=rounds, warmup_rounds=1, iterations=1)
    record(f"embed b{batch}", name, bench.EMBED_PASSES * len(bench.SENTENCES), "sent/s", benchmark)


def test_engines_agree_on_embeddings(minilm_dir):
    ours = load(bench.REFLLM, minilm_dir).embed(bench.SENTENCES)
    try:
        theirs = load(bench.SENTENCE_TRANSFORMERS, minilm_dir).embed(bench.SENTENCES)
    except pytest.skip.Exception:
        return
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
