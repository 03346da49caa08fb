"""The real default model (SmolLM2-135M-Instruct) against transformers, same weights.

Logits on several prompts: max |dlogit| <= 1e-3 in float32 (against transformers in
float32) and <= 1e-8 in float64 (against transformers in float64). Greedy generation
of 128 tokens equals transformers' `generate(do_sample=False)` token for token, with
repeat penalty 1.0, and with 1.1 over a window as long as the sequence (where SPEC 3's
windowed penalty and transformers' whole-sequence penalty coincide).
"""

from __future__ import annotations


import numpy as np
import pytest

from refllm import engine
from refllm.generate import Generation
from refllm.llama import Llama
from refllm.types import InferencingParams
from tests.llama_util import hf_logits, hf_model

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # the real model, minutes of generation

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Les élèves ont étudié 3 langues: 中文, español y English. 🙂",
]


@pytest.fixture(scope="module")
def llm(llama_dir):
    return engine.get_llm(llama_dir)


@pytest.fixture(scope="module")
def hf32(llama_dir):
    return hf_model(llama_dir, torch.float32)


def test_logits_float32(llm, llama_dir, hf32):
    worst = 0.0
    for prompt in PROMPTS:
        ids = llm.encode(prompt)
        ours = llm.model(ids)
        theirs = hf_logits(llama_dir, ids, torch.float32, model=hf32)
        worst = max(worst, float(np.max(np.abs(ours - theirs))))
    print(f"float32 max |dlogit| = {worst:.3g}")
    assert worst <= 1e-3


def test_logits_float64(llama_dir, llm):
    model = Llama.from_pretrained(llama_dir, dtype=np.float64)
    hf64 = hf_model(llama_dir, torch.float64)
    worst = 0.0
    for prompt in PROMPTS[:2]:
        ids = llm.encode(prompt)
        worst = max(worst, float(np.max(np.abs(model(ids) - hf_logits(llama_dir, ids, torch.float64, model=hf64)))))
    print(f"float64 max |dlogit| = {worst:.3g}")
    assert worst <= 1e-8


def test_no_bos_is_added(llm):
    # SmolLM2's GGUF says add_bos_token = false, as transformers' GGUF loader does.
    ids = llm.encode("Hello")
    assert ids == llm.tokenizer.encode("Hello", add_special_tokens=False).ids


@pytest.mark.parametrize("penalty", [1.0, 1.1])
@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_greedy_128_tokens_equal_transformers(llm, hf32, prompt, penalty):
    params = InferencingParams(max_tokens=128, temperature=0.0, repeat_penalty=penalty,
                               repeat_penalty_last_n_token_count=4096)
    gen = Generation(llm, prompt, params)
    gen.run()
    ids = torch.tensor([gen.prompt_ids])
    with torch.no_grad():
        out = hf32.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=128,
                            repetition_penalty=penalty, eos_token_id=sorted(llm.eos_token_ids), pad_token_id=0,
                            temperature=None, top_p=None, top_k=None)
    theirs = out[0, len(gen.prompt_ids):].tolist()
    assert gen.tokens == theirs, f"first divergence at {next(i for i, (a, b) in enumerate(zip(gen.tokens, theirs)) if a != b)}"
