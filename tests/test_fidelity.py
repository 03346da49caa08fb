"""Fidelity beyond SmolLM2 (issue 15, part 2): what Llama 2/3, Mistral and Qwen2 need.

Each test is against the real peer, built locally: tokenizers built with the
`tokenizers` library and wrapped by transformers (the way transformers reads the same
directory), tiny random LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM
checkpoints, GGUF files written with the `gguf` package's GGUFWriter.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from refllm import ops


# ------------------------------------------------------------------ 1. ops.causal_attention


def attention_by_definition(q, k, v, start_pos):  # [T, NH, HD], [S, NKV, HD] x2 -> [T, NH, HD], float64
    """Query t at position start_pos + t, head h: softmax over keys 0 .. start_pos + t of
    head h // G of q.k / sqrt(HD), times the values. One query and one head at a time."""
    T, NH, HD = q.shape
    G = NH // k.shape[1]
    out = np.zeros((T, NH, HD))
    for t in range(T):
        for h in range(NH):
            keys, values = k[: start_pos + t + 1, h // G], v[: start_pos + t + 1, h // G]  # [start_pos+t+1, HD] x2
            scores = keys @ q[t, h] / math.sqrt(HD)  # [start_pos+t+1]
            p = np.exp(scores - scores.max())
            out[t, h] = (p / p.sum()) @ values
    return out


@pytest.mark.parametrize("T, start_pos", [(1, 2), (1, 0), (1, 5), (3, 2)])
def test_causal_attention_sees_only_keys_up_to_its_position(T, start_pos):
    """Six keys in the cache; a query at position start_pos must not see the later ones
    (at T = 1 it used to see all six: off by 1.17 at position 2)."""
    rng = np.random.default_rng(T * 10 + start_pos)
    NH, NKV, HD, S = 4, 2, 8, 6
    q = rng.standard_normal((T, NH, HD))  # [T, NH, HD]
    k, v = rng.standard_normal((S, NKV, HD)), rng.standard_normal((S, NKV, HD))  # [S, NKV, HD] x2
    got = ops.causal_attention(q, k, v, start_pos)  # [T, NH, HD]
    np.testing.assert_allclose(got, attention_by_definition(q, k, v, start_pos), rtol=0, atol=1e-13)
