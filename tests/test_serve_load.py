"""Under load `refllm serve` keeps serving, batched and bounded (issue 5 point 5, issue 14).

One bounded load test, on loopback, against one server (max_batch 8, max_queue 64):

1. a 10,000-text embedding request, and while it runs a 1-token /infer, which must be
   answered before the embedding is;
2. 64 concurrent mixed requests: greedy and seeded, plain and streaming, in all three
   dialects, embeddings, malformed bodies, and streams whose clients hang up after two
   events; /health is polled throughout;
3. 200 requests whose clients give up after a second while eight long generations fill
   the batch: those that were queued leave the queue, the rest are refused as
   overloaded in their dialect's way (TGI 429, OpenAI and Spin 503 with Retry-After).

Every well-formed answer must equal `refllm.infer` / `generate_embeddings` exactly,
whatever it was batched with; the cancelled generations stop; the server still answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time

import httpx
import numpy as np
import pytest

import refllm
from refllm import engine, registry
from refllm.serve.app import ServerThread
from refllm.serve.core import NO_TOP_K, ServerConfig
from refllm.types import InferencingParams

pytestmark = pytest.mark.usefixtures("hf_hub_online")

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
SPIN_SEEDED = {"maxTokens": 3, "repeatPenalty": 1.1, "repeatPenaltyLastNTokenCount": 64, "temperature": 0.8,
               "topK": 40, "topP": 0.9}
TGI_SEEDED = InferencingParams(3, 1.0, ALL, 0.7, NO_TOP_K, 1.0)  # do_sample, temperature 0.7
BIG_N = int(os.environ.get("REFLLM_TEST_BIG_EMBEDDING", 10_000))  # fewer: a quick run of the same test
BIG = [f"t{i % 97} {'x' * (i % 7)}" for i in range(BIG_N)]  # short texts of a few lengths
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
    spin_seeded = InferencingParams(**{"max_tokens": 3, "repeat_penalty": 1.1, "repeat_penalty_last_n_token_count": 64,
                                       "temperature": 0.8, "top_k": 40, "top_p": 0.9})
    return {
        "greedy": {p: infer(p, TGI_GREEDY) for p in PROMPTS},
        "chat": {seed: infer(chat, CHAT_SAMPLED, seed).text for seed in range(4)},
        "spin_seeded": {seed: infer(PROMPTS[seed % 4], spin_seeded, seed) for seed in range(6)},
        "tgi_seeded": {seed: infer(PROMPTS[seed % 4], TGI_SEEDED, seed).text for seed in range(6)},
        "embed": {t: np.float32(refllm.generate_embeddings(MINILM, [t], models_dir=models_root).embeddings[0])
                  for t in TEXTS},
        "big": refllm.generate_embeddings(MINILM, BIG, models_dir=models_root),
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


async def spin_seeded(c, seed, expected):
    r = await c.post("/infer", content=json.dumps({"prompt": PROMPTS[seed % 4], "options": SPIN_SEEDED, "seed": seed}))
    assert r.status_code == 200, r.text
    want = expected["spin_seeded"][seed]
    assert r.json()["text"] == want.text and r.json()["usage"]["generatedTokenCount"] == want.usage.generated_token_count


async def tgi_seeded(c, seed, expected, stream):
    body = {"inputs": PROMPTS[seed % 4], "parameters": {"max_new_tokens": 3, "do_sample": True, "temperature": 0.7,
                                                       "seed": seed}}
    if not stream:
        r = await c.post("/generate", json=body, headers={"x-use-cache": "0"})
        assert r.status_code == 200, r.text
        assert r.json()["generated_text"] == expected["tgi_seeded"][seed]
        return
    async with c.stream("POST", "/generate_stream", json=body) as r:
        assert r.status_code == 200
        events = [json.loads(line[len("data: "):]) async for line in r.aiter_lines() if line.startswith("data: {")]
    assert "".join(e["token"]["text"] for e in events) == expected["tgi_seeded"][seed]
    assert events[-1]["generated_text"] == expected["tgi_seeded"][seed]


async def completions(c, expected):
    """Two prompts in one request: decoded together, each as refllm.infer alone."""
    r = await c.post("/v1/completions", json={"prompt": PROMPTS[:2], "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert [ch["text"] for ch in r.json()["choices"]] == [expected["greedy"][p].text for p in PROMPTS[:2]]


async def poll_health(c, stop: asyncio.Event, latencies: list):
    while not stop.is_set():
        t = time.monotonic()
        r = await c.get("/health", timeout=30)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        latencies.append(time.monotonic() - t)
        await asyncio.sleep(0.25)


def mixed(c, expected) -> tuple[list, list]:
    """The 64 concurrent requests: (well-formed and malformed jobs, hang-ups)."""
    jobs = []
    jobs += [spin_infer(c, PROMPTS[i % 4], expected) for i in range(8)]
    jobs += [spin_seeded(c, seed, expected) for seed in range(6)]
    jobs += [tgi_generate(c, PROMPTS[i % 4], expected) for i in range(6)]
    jobs += [tgi_seeded(c, seed, expected, stream=seed % 2 == 1) for seed in range(6)]
    jobs += [chat(c, seed, expected, stream=seed % 2 == 1) for seed in range(4)]
    jobs += [completions(c, expected) for _ in range(2)]
    jobs += [embed(c, TEXTS[i % 3], expected, ("spin", "openai", "hf")[i % 3]) for i in range(12)]
    jobs += [malformed(c, path, content) for path, content in MALFORMED]
    cancels = [cancelled_stream(c, ("tgi", "openai")[i % 2]) for i in range(10)]
    assert len(jobs) + len(cancels) == 64
    return jobs, cancels


async def abandoned(c, i: int):
    """A request whose client gives up after a second: None if it timed out (it was
    queued), else the overload answer it got at once."""
    kind = ("tgi", "openai", "spin")[i % 3]
    path, body = {"tgi": ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 1}}),
                  "openai": ("/v1/completions", {"prompt": "Hi", "max_tokens": 1}),
                  "spin": ("/infer", {"prompt": "Hi", "options": {"maxTokens": 1}})}[kind]
    try:
        r = await c.post(path, content=json.dumps(body), headers={"x-use-cache": "0"}, timeout=1.0)
    except httpx.TimeoutException:
        return None
    if kind == "tgi":
        assert r.status_code == 429 and r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    else:
        assert r.status_code == 503 and r.headers["retry-after"] == "1", (kind, r.status_code, r.text)
    return r.status_code


async def long_stream(c, started: asyncio.Event, stop: asyncio.Event):
    async with c.stream("POST", "/generate_stream", json={"inputs": "Once upon a time",
                                                          "parameters": {"max_new_tokens": 300}}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                started.set()
            if stop.is_set():
                return


@pytest.mark.slow  # the 10,000-text embedding dominates: ~1 min on an idle 2-core machine, many on a busy one
def test_bounded_load(models_root, expected):
    config = ServerConfig(models_dir=models_root, max_batch=8, max_queue=64, max_client_batch=len(BIG))
    with ServerThread(config) as server:
        scheduler, stats = server.engine.scheduler, server.engine.stats
        before = dict(stats)

        async def main():
            limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=server.url, timeout=1800, limits=limits) as c:
                stop, latencies = asyncio.Event(), []
                health = asyncio.create_task(poll_health(c, stop, latencies))

                # 1. the big embedding, and a short request sent while it runs
                t0 = time.monotonic()
                big = asyncio.create_task(c.post("/v1/embeddings", json={"input": BIG, "model": MINILM}))
                while not scheduler.embedding or stats["units"] - before["units"] < 3:
                    await asyncio.sleep(0.05)
                r = await c.post("/infer", content=json.dumps({"prompt": PROMPTS[0], "options": SPIN_OPTIONS}))
                short_done = time.monotonic() - t0
                assert r.status_code == 200 and r.json()["text"] == expected["greedy"][PROMPTS[0]].text
                assert not big.done()

                # 2. 64 mixed requests, still during the embedding
                jobs, cancels = mixed(c, expected)
                results = await asyncio.gather(*jobs, *cancels, return_exceptions=True)
                failures = [r for r in results if isinstance(r, BaseException)]
                assert not failures, failures[:3]
                assert results[-len(cancels):] == [2] * len(cancels)

                # 3. 200 abandoned requests while 8 long generations fill the batch
                started, release = asyncio.Event(), asyncio.Event()
                longs = [asyncio.create_task(long_stream(c, started, release)) for _ in range(8)]
                while len(scheduler.running) < 8:
                    await asyncio.sleep(0.05)
                order = list(range(200))
                random.Random(0).shuffle(order)
                answers = await asyncio.gather(*(abandoned(c, i) for i in order))
                gone_at = time.monotonic()
                while scheduler.queued and time.monotonic() - gone_at < 10:
                    await asyncio.sleep(0.02)
                queued_after = scheduler.queued
                release.set()
                await asyncio.gather(*longs)

                r = await big
                big_done = time.monotonic() - t0
                stop.set()
                await health
                return r, short_done, big_done, answers, queued_after, latencies

        r, short_done, big_done, answers, queued_after, latencies = asyncio.run(main())

        # the big embedding: generate_embeddings' vectors, bit for bit
        assert r.status_code == 200
        data = r.json()["data"]
        assert [d["index"] for d in data] == list(range(len(BIG)))
        assert [d["embedding"] for d in data] == expected["big"].embeddings
        assert r.json()["usage"]["prompt_tokens"] == expected["big"].usage.prompt_token_count
        assert short_done < big_done

        # abandoned: some queued (then left), the rest refused as overloaded at once
        timed_out, refused = answers.count(None), len(answers) - answers.count(None)
        assert timed_out >= 1 and refused >= 1 and queued_after == 0, (timed_out, refused, queued_after)

        deadline = time.monotonic() + 60  # the hung-up and abandoned generations stop
        while (scheduler.running or scheduler.queued) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not scheduler.running and scheduler.queued == 0
        assert stats["finished"] - before["finished"] == 1 + 8 + 6 + 6 + 6 + 4 + 2 * 2
        r = httpx.post(server.url + "/infer", content=json.dumps({"prompt": PROMPTS[1], "options": SPIN_OPTIONS}),
                       timeout=120)
        assert r.status_code == 200 and r.json()["text"] == expected["greedy"][PROMPTS[1]].text
        rows = stats["batch_rows"] - before["batch_rows"]
        steps = stats["steps"] - before["steps"]
        print(f"\nbounded load: 1-token request {short_done:.1f} s, {len(BIG):,}-text embedding {big_done:.1f} s; "
              f"abandoned {timed_out} timed out, {refused} refused; {steps} steps, {rows / max(steps, 1):.2f} "
              f"sequences a step; /health max {max(latencies) * 1000:.0f} ms over {len(latencies)} polls")
