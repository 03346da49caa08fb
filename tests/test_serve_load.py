"""Under load `refllm serve` keeps serving (issue 5, point 5).

54 concurrent requests on loopback — well-formed ones in all three dialects, malformed
ones, and streams whose clients hang up after the first tokens — while /health is
polled. Afterwards every well-formed request has the answer `refllm.infer` /
`generate_embeddings` gives, the cancelled generations have stopped, and the server
still answers.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest

import refllm
from refllm import engine, registry
from refllm.serve.app import ServerThread
from refllm.serve.core import NO_TOP_K, ServerConfig
from refllm.types import InferencingParams

LLAMA = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
PROMPTS = ["The capital of France is", "Water boils at", "My favourite colour is", "def add(a, b):"]
# Greedy, without a penalty, Spin's and TGI's requests pick the same tokens whatever
# their other parameters: one reference answer per prompt serves both.
SPIN_OPTIONS = {"maxTokens": 2, "repeatPenalty": 1.0, "repeatPenaltyLastNTokenCount": 64, "temperature": 0.0,
                "topK": 40, "topP": 0.9}
ALL = 2**32 - 1
TGI_GREEDY = InferencingParams(2, 1.0, ALL, 0.0, NO_TOP_K, 1.0)
CHAT_SAMPLED = InferencingParams(2, 1.0, ALL, 0.7, NO_TOP_K, 1.0)
TEXTS = ["alpha", "beta gamma", "the quick brown fox"]
MALFORMED = [
    ("/infer", b"{oops"),
    ("/infer", b'{"prompt": "\xc3\x28"}'),
    ("/infer", b'{"prompt": 42}'),
    ("/embed", b'{"input": [1, 2]}'),
    ("/generate", b'{"inputs": "Hi", "parameters": {"max_new_tokens": 1e400}}'),
    ("/generate", b'{"inputs": "Hi", "parameters": {"max_new_tokens": ' + b"7" * 40 + b"}}"),
    ("/", b"[[[[[[[["),
    ("/v1/chat/completions", b'{"messages": {"role": "user"}}'),
    ("/v1/embeddings", b'{"input": "x", "encoding_format": 3}'),
    ("/v1/completions", b'{"prompt": "Hi", "temperature": "warm"}'),
]


@pytest.fixture(scope="module")
def expected(models_root):
    """refllm's own answers for every well-formed request the test sends."""
    llm = engine.get_llm(registry.find_llm(LLAMA, models_root))
    chat = llm.apply_chat_template([{"role": "user", "content": "Say hi"}])
    infer = lambda prompt, params, seed=None: refllm.infer(LLAMA, prompt, params, seed=seed, models_dir=models_root)  # noqa: E731
    return {
        "greedy": {p: infer(p, TGI_GREEDY) for p in PROMPTS},
        "chat": {seed: infer(chat, CHAT_SAMPLED, seed).text for seed in range(4)},
        "embed": {t: np.float32(refllm.generate_embeddings(MINILM, [t], models_dir=models_root).embeddings[0])
                  for t in TEXTS},
    }


async def spin_infer(c, prompt, expected):
    r = await c.post("/infer", content=json.dumps({"model": LLAMA, "prompt": prompt, "options": SPIN_OPTIONS}))
    want = expected["greedy"][prompt]
    assert r.status_code == 200, r.text
    assert r.json() == {"text": want.text, "usage": {"promptTokenCount": want.usage.prompt_token_count,
                                                      "generatedTokenCount": want.usage.generated_token_count}}


async def tgi_generate(c, prompt, expected):
    r = await c.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 2}},
                     headers={"x-use-cache": "0"})
    assert r.status_code == 200, r.text
    assert r.json()["generated_text"] == expected["greedy"][prompt].text


async def chat(c, seed, expected, stream):
    body = {"model": LLAMA, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 2,
            "temperature": 0.7, "seed": seed}
    if not stream:
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == expected["chat"][seed]
        return
    text, usage = "", None
    async with c.stream("POST", "/v1/chat/completions",
                        json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        lines = [line async for line in r.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line[len("data: "):])
        if chunk["choices"]:
            text += chunk["choices"][0]["delta"].get("content") or ""
        else:
            usage = chunk["usage"]
    assert text == expected["chat"][seed] and usage["completion_tokens"] >= 1


async def embed(c, text, expected, route):
    if route == "spin":
        r = await c.post("/embed", content=json.dumps({"model": MINILM, "input": [text]}))
        vector = r.json()["embeddings"][0]
    elif route == "openai":
        r = await c.post("/v1/embeddings", json={"model": MINILM, "input": text})
        vector = r.json()["data"][0]["embedding"]
    else:
        r = await c.post("/", json={"inputs": text})
        vector = r.json()[0]
    assert r.status_code == 200, r.text
    assert np.array_equal(np.float32(vector), expected["embed"][text])


async def malformed(c, path, content):
    r = await c.post(path, content=content)
    assert 400 <= r.status_code < 500, (path, content, r.status_code, r.text)


async def cancelled_stream(c, dialect):
    """Read the first event or two of a long generation, then hang up."""
    if dialect == "tgi":
        request = c.stream("POST", "/generate_stream", json={"inputs": "Once upon a time",
                                                             "parameters": {"max_new_tokens": 300}})
    else:
        request = c.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 300, "stream": True})
    async with request as r:
        assert r.status_code == 200
        n = 0
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                n += 1
                if n == 2:
                    break
    return n


async def poll_health(c, stop: asyncio.Event, latencies: list):
    while not stop.is_set():
        t = time.monotonic()
        r = await c.get("/health", timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        latencies.append(time.monotonic() - t)
        await asyncio.sleep(0.25)


@pytest.mark.slow  # ~25 s on an idle 2-core machine, ~100 s on a busy one
def test_fifty_four_concurrent_mixed_requests(models_root, expected):
    with ServerThread(ServerConfig(models_dir=models_root)) as server:
        stats = server.engine.stats
        before = dict(stats)

        async def main():
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=server.url, timeout=240, limits=limits) as c:
                jobs = []
                jobs += [spin_infer(c, PROMPTS[i % 4], expected) for i in range(10)]
                jobs += [tgi_generate(c, PROMPTS[i % 4], expected) for i in range(6)]
                jobs += [chat(c, seed, expected, stream=seed % 2 == 1) for seed in range(4)]
                jobs += [embed(c, TEXTS[i % 3], expected, ("spin", "openai", "hf")[i % 3]) for i in range(18)]
                jobs += [malformed(c, path, content) for path, content in MALFORMED]
                cancels = [cancelled_stream(c, ("tgi", "openai")[i % 2]) for i in range(6)]
                assert len(jobs) + len(cancels) >= 50
                stop, latencies = asyncio.Event(), []
                health = asyncio.create_task(poll_health(c, stop, latencies))
                results = await asyncio.wait_for(asyncio.gather(*jobs, *cancels, return_exceptions=True), 300)
                stop.set()
                await health
                failures = [r for r in results if isinstance(r, BaseException)]
                assert not failures, failures[:3]
                assert results[-len(cancels):] == [2] * len(cancels)
                return latencies

        t0 = time.monotonic()
        latencies = asyncio.run(main())
        elapsed = time.monotonic() - t0

        deadline = time.monotonic() + 60  # cancelled generations stop at their next token
        while stats["cancelled"] - before["cancelled"] < 6 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stats["cancelled"] - before["cancelled"] == 6
        assert stats["finished"] - before["finished"] == 10 + 6 + 4
        # 6 cancelled streams of 300 tokens would be 1,800 units; they stopped within a few each
        assert stats["units"] - before["units"] < (10 + 6 + 4) * 2 + 18 + 6 * 20
        assert latencies and max(latencies) < 5.0, max(latencies)
        r = httpx.post(server.url + "/infer", content=json.dumps({"prompt": PROMPTS[0], "options": SPIN_OPTIONS}),
                       timeout=60)
        assert r.status_code == 200 and r.json()["text"] == expected["greedy"][PROMPTS[0]].text
        print(f"\n54 requests in {elapsed:.1f} s; /health: {len(latencies)} polls, max {max(latencies) * 1000:.0f} ms")
