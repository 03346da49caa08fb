"""Real, unmodified clients against `refllm serve` on a loopback port (SPEC 7, issue 5).

huggingface_hub's InferenceClient, the openai package, and Spin's remote_http requests
byte for byte; every answer is checked against `refllm.infer` / `generate_embeddings`
for the same request and seed. max_tokens stays tiny: the NumPy model is slow here.
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache

import httpx
import numpy as np
import pytest

import refllm
from refllm import engine, registry
from refllm.serve.app import ServerThread
from refllm.serve.core import NO_TOP_K, ServerConfig
from refllm.types import InferencingParams

pytestmark = pytest.mark.usefixtures("hf_hub_online")

pytest.importorskip("huggingface_hub")
pytest.importorskip("openai")

LLAMA = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
TOKEN = "s3cret-token"
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is 2+2?"}]
ALL = 2**32 - 1  # the repeat-penalty window and top-k that TGI's and OpenAI's parameters map to


@pytest.fixture(scope="module")
def server(models_root):
    with ServerThread(ServerConfig(models_dir=models_root, tokens=(TOKEN,))) as s:
        yield s


@pytest.fixture(scope="module")
def ref(models_root):
    """refllm's own answers, computed once per distinct request."""

    @lru_cache(maxsize=None)
    def infer(prompt, params, seed=None, stop=()):
        gen = refllm.infer_stream(LLAMA, prompt, params, seed=seed, stop=stop, models_dir=models_root)
        gen.run()
        return gen

    return infer


def chat_prompt(models_root, messages=MESSAGES) -> str:
    return engine.get_llm(registry.find_llm(LLAMA, models_root)).apply_chat_template(messages)


def log_softmax(logits, token):
    z = np.asarray(logits, dtype=np.float64)
    return z[token] - (z.max() + np.log(np.exp(z - z.max()).sum()))


def greedy(n):  # TGI / OpenAI greedy: no penalty, temperature 0
    return InferencingParams(max_tokens=n, repeat_penalty=1.0, repeat_penalty_last_n_token_count=ALL,
                             temperature=0.0, top_k=NO_TOP_K, top_p=1.0)


# ----------------------------------------------------------------------------- Spin's remote_http

def spin_post(server, path, body: dict):
    """What Spin's crates/llm-remote-http sends: serde_json text, `authorization: bearer <token>`,
    and no content-type."""
    content = json.dumps(body, separators=(",", ":")).encode()
    with httpx.Client(timeout=120) as c:
        req = c.build_request("POST", server.url + path, content=content, headers={"authorization": f"bearer {TOKEN}"})
        assert "content-type" not in req.headers
        return c.send(req)


def test_spin_infer_exactly_as_spin_sends_it(server, ref):
    options = {"maxTokens": 5, "repeatPenalty": 1.1, "repeatPenaltyLastNTokenCount": 64, "temperature": 0.0,
               "topK": 40, "topP": 0.9}
    r = spin_post(server, "/infer", {"model": LLAMA, "prompt": PROMPT, "options": options})
    assert r.status_code == 200, r.text
    want = ref(PROMPT, InferencingParams(5, 1.1, 64, 0.0, 40, 0.9)).result
    assert r.json() == {"text": want.text, "usage": {"promptTokenCount": want.usage.prompt_token_count,
                                                      "generatedTokenCount": want.usage.generated_token_count}}


def test_spin_infer_sampled_with_a_seed_matches_infer(server, ref):
    options = {"maxTokens": 4, "repeatPenalty": 1.1, "repeatPenaltyLastNTokenCount": 64, "temperature": 0.8,
               "topK": 40, "topP": 0.9}
    r = spin_post(server, "/infer", {"model": LLAMA, "prompt": PROMPT, "options": options, "seed": 1234})
    assert r.status_code == 200, r.text
    assert r.json()["text"] == ref(PROMPT, InferencingParams(max_tokens=4), 1234).result.text


def test_spin_embed_exactly_as_spin_sends_it(server, models_root):
    texts = ["hello world", "Spin is a framework for WebAssembly apps", ""]
    r = spin_post(server, "/embed", {"model": MINILM, "input": texts})
    assert r.status_code == 200, r.text
    want = refllm.generate_embeddings(MINILM, texts, models_dir=models_root)
    body = r.json()
    assert body["usage"] == {"promptTokenCount": want.usage.prompt_token_count}
    assert np.array_equal(np.float32(body["embeddings"]), np.float32(want.embeddings))


# ----------------------------------------------------------------------------- huggingface_hub

@pytest.fixture(scope="module")
def hf(server):
    from huggingface_hub import InferenceClient

    return InferenceClient(base_url=server.url, api_key=TOKEN, timeout=120)


def test_hf_text_generation_plain(hf, ref):
    text = hf.text_generation(PROMPT, max_new_tokens=5)
    assert text == ref(PROMPT, greedy(5)).result.text


def test_hf_text_generation_details(hf, ref):
    out = hf.text_generation(PROMPT, max_new_tokens=4, details=True, do_sample=True, temperature=0.7, top_k=20,
                             top_p=0.95, repetition_penalty=1.2, seed=7)
    gen = ref(PROMPT, InferencingParams(4, 1.2, ALL, 0.7, 20, 0.95), 7)
    assert out.generated_text == gen.result.text
    d = out.details
    assert (d.finish_reason, d.generated_tokens, d.seed) == ("length", 4, 7)
    assert [t.id for t in d.tokens] == gen.tokens
    assert "".join(t.text for t in d.tokens) == gen.result.text
    for t, step in zip(d.tokens, gen.steps):
        assert t.logprob == pytest.approx(log_softmax(step.logits, step.token), abs=1e-9)
        assert t.logprob <= 0


def test_hf_text_generation_stream(hf, ref):
    pieces = list(hf.text_generation(PROMPT, max_new_tokens=5, stream=True))
    assert "".join(pieces) == ref(PROMPT, greedy(5)).result.text
    events = list(hf.text_generation(PROMPT, max_new_tokens=5, stream=True, details=True))
    assert [e.index for e in events] == [1, 2, 3, 4, 5]
    assert [e.token.id for e in events] == ref(PROMPT, greedy(5)).tokens
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    assert events[-1].generated_text == ref(PROMPT, greedy(5)).result.text
    assert (events[-1].details.finish_reason, events[-1].details.generated_tokens) == ("length", 5)


def test_hf_text_generation_stop_and_full_text(hf, ref):
    gen = ref(PROMPT, greedy(8), None, (",",))
    out = hf.text_generation(PROMPT, max_new_tokens=8, stop=[","], return_full_text=True, details=True)
    if gen.finish_reason == "stop":  # TGI keeps the stop string at the end of the text
        assert out.generated_text == PROMPT + gen.result.text + ","
        assert out.details.finish_reason == "stop_sequence"
    else:
        assert out.generated_text == PROMPT + gen.result.text


def test_hf_chat_completion_plain_and_streamed(hf, ref, models_root):
    want = ref(chat_prompt(models_root), InferencingParams(4, 1.0, ALL, 0.5, NO_TOP_K, 1.0), 11)
    out = hf.chat_completion(MESSAGES, max_tokens=4, temperature=0.5, seed=11)
    assert out.choices[0].message.content == want.result.text
    assert out.choices[0].finish_reason in ("length", "stop")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(want.prompt_ids), len(want.tokens))
    chunks = list(hf.chat_completion(MESSAGES, max_tokens=4, temperature=0.5, seed=11, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.result.text


def test_hf_feature_extraction(hf, models_root):
    one = hf.feature_extraction("hello world")
    assert one.shape == (1, 384)
    many = hf.feature_extraction(["hello world", "goodbye"])
    want = refllm.generate_embeddings(MINILM, ["hello world", "goodbye"], models_dir=models_root).embeddings
    assert np.array_equal(many, np.float32(want))
    assert np.array_equal(one, np.float32(refllm.generate_embeddings(MINILM, ["hello world"], models_dir=models_root).embeddings))
    np.testing.assert_allclose(one[0], many[0], atol=1e-6)  # batched with another text: the same up to rounding


# ----------------------------------------------------------------------------- openai

@pytest.fixture(scope="module")
def oa(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0, timeout=120)


def test_openai_chat_plain(oa, ref, models_root):
    want = ref(chat_prompt(models_root), InferencingParams(4, 1.0, ALL, 0.5, NO_TOP_K, 1.0), 11)
    out = oa.chat.completions.create(model=LLAMA, messages=MESSAGES, max_tokens=4, temperature=0.5, seed=11)
    assert out.model == LLAMA and out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want.result.text
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        len(want.prompt_ids), len(want.tokens), len(want.prompt_ids) + len(want.tokens))


def test_openai_chat_streamed_with_usage(oa, ref, models_root):
    want = ref(chat_prompt(models_root), InferencingParams(4, 1.0, ALL, 0.5, NO_TOP_K, 1.0), 11)
    chunks = list(oa.chat.completions.create(model=LLAMA, messages=MESSAGES, max_tokens=4, temperature=0.5, seed=11,
                                             stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.result.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.tokens)


def test_openai_completions(oa, ref):
    out = oa.completions.create(model=LLAMA, prompt=PROMPT, max_tokens=5, temperature=0)
    assert out.choices[0].text == ref(PROMPT, greedy(5)).result.text
    assert out.choices[0].finish_reason == "length" and out.usage.prompt_tokens == 5


def test_openai_embeddings_base64_default_and_float(oa, models_root):
    texts = ["hello world", "goodbye"]
    want = np.float32(refllm.generate_embeddings(MINILM, texts, models_dir=models_root).embeddings)
    out = oa.embeddings.create(model=MINILM, input=texts)  # the package asks for base64
    assert np.array_equal(np.float32([d.embedding for d in out.data]), want)
    assert [d.index for d in out.data] == [0, 1] and out.usage.prompt_tokens > 0
    one = np.float32(refllm.generate_embeddings(MINILM, ["hello world"], models_dir=models_root).embeddings[0])
    raw = oa.embeddings.with_raw_response.create(model=MINILM, input="hello world", encoding_format="base64")
    b64 = json.loads(raw.text)["data"][0]["embedding"]
    assert np.array_equal(np.frombuffer(base64.b64decode(b64), dtype="<f4"), one)
    flt = oa.embeddings.create(model=MINILM, input="hello world", encoding_format="float")
    assert np.array_equal(np.float32(flt.data[0].embedding), one)


def test_openai_models_list(oa):
    ids = [m.id for m in oa.models.list()]
    assert LLAMA in ids and MINILM in ids
    assert oa.models.retrieve(MINILM).id == MINILM


# ----------------------------------------------------------------------------- logprobs

def test_logprobs_in_each_dialect(server, hf, oa, ref):
    gen = ref(PROMPT, greedy(3))
    want = [log_softmax(s.logits, s.token) for s in gen.steps]
    # TGI: greedy without a penalty picks the most likely token, so it heads top_tokens
    out = hf.text_generation(PROMPT, max_new_tokens=3, details=True, top_n_tokens=2, decoder_input_details=True)
    assert [t.logprob for t in out.details.tokens] == pytest.approx(want, abs=1e-9)
    top = [t[0] if isinstance(t[0], dict) else vars(t[0]) for t in out.details.top_tokens]  # hub leaves them dicts
    assert [t["id"] for t in top] == gen.tokens
    assert [p.id for p in out.details.prefill] == gen.prompt_ids
    # OpenAI chat and completions
    r = oa.completions.create(model=LLAMA, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(want, abs=1e-9)
    assert all(len(top) == 2 for top in r.choices[0].logprobs.top_logprobs)
    c = oa.chat.completions.create(model=LLAMA, messages=MESSAGES, max_tokens=2, temperature=0, logprobs=True,
                                   top_logprobs=3)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the top one
