"""A 7B-shaped bfloat16 checkpoint on one machine: refllm beside transformers (`refllm.bench.big_model`).

    pytest bench/test_big_model.py -s

Writes, once, a random Llama with Llama-2-7B's shapes (32 layers, hidden 4096,
intermediate 11008, 32 heads, vocabulary 32000) in bfloat16, 13.5 GB, into
~/.cache/refllm/bench/llama-7b-shaped-bf16/ (`tests.llama_util.write_random_llama`,
~100 MB of memory to write), then measures load time, peak RSS and seconds a token of
refllm (matrices widened on use) and of transformers (bfloat16), one process at a time,
and writes the table to bench/results/big_model.md. Needs ~14 GB of free memory and
disk; the same as `refllm bench --model ~/.cache/refllm/bench/llama-7b-shaped-bf16`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from refllm.bench import big_model

SHAPES_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def checkpoint_7b() -> Path:
    from tests.llama_util import write_random_llama

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "refllm" / "bench"
    final = base / "llama-7b-shaped-bf16"
    if not (final / "config.json").is_file():
        partial = base / "llama-7b-shaped-bf16.partial"
        write_random_llama(partial, SHAPES_7B, dtype="bfloat16", seed=7)
        partial.rename(final)
    return final


@pytest.mark.slow
def test_7b_shaped_bf16_refllm_beside_transformers():
    model_dir = checkpoint_7b()
    results = big_model.run(model_dir, new_tokens=8, log=print)
    table = big_model.report(model_dir, results)
    print("\n" + table)
    out = Path(__file__).parent / "results" / "big_model.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(table + "\n")
    assert all("error" not in r for r in results), results
