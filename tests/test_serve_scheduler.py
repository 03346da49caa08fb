"""The continuous-batching scheduler (refllm.serve.scheduler) on a tiny random model.

No HTTP here: generations are submitted to a `Scheduler` on an asyncio loop, with
staggered arrivals, and each one's tokens, text and logits are compared, exactly, with
the same `Generation` run alone (`refllm.infer`'s path). Then the queue: a cancelled
request leaves it at once, a full one refuses with "overloaded".
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from refllm.generate import Generation, LoadedLLM
from refllm.serve.errors import ServeError
from refllm.serve.scheduler import Scheduler
from refllm.types import InferencingParams
from tests.tiny_models import make_tiny_llm

PROMPTS = ["The quick brown fox", "Why is the sky blue?", "def f(x):", "Héllo wörld, naïve café — 你好",
           "jumps over the lazy dog. The quick brown fox jumps", "a", "Because of Rayleigh", "return x * 2"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LoadedLLM.from_dir(make_tiny_llm(tmp_path_factory.mktemp("models")), name="tiny")


def requests(llm):
    """Greedy and seeded, with penalties, top-k/top-p, stop strings and lengths 1..12."""
    out = []
    for i, prompt in enumerate(PROMPTS * 2):
        params = InferencingParams(max_tokens=1 + (5 * i) % 12, repeat_penalty=(1.0, 1.3)[i % 2],
                                   repeat_penalty_last_n_token_count=8, temperature=(0.0, 0.8, 1.5)[i % 3],
                                   top_k=(40, 5)[i % 2], top_p=(1.0, 0.9)[i % 2])
        out.append(dict(prompt=prompt, params=params, seed=1000 + i, stop=["qu"] if i % 5 == 4 else ()))
    return out


def alone(llm, r) -> Generation:
    gen = Generation(llm, r["prompt"], r["params"], seed=r["seed"], stop=r["stop"])
    gen.run()
    return gen


async def through(scheduler: Scheduler, gen: Generation, delay: float) -> list[str]:
    await asyncio.sleep(delay)
    ticket = scheduler.submit_generation(gen)
    pieces = []
    while (event := await ticket.events.get())[0] == "piece":
        pieces.append(event[1])
    assert event == ("done",), event
    return pieces


def assert_same(a: Generation, b: Generation) -> None:
    assert a.tokens == b.tokens and a.result == b.result and a.finish_reason == b.finish_reason
    assert [s.u for s in a.steps] == [s.u for s in b.steps]
    for sa, sb in zip(a.steps, b.steps):
        np.testing.assert_array_equal(sa.logits, sb.logits)  # bit for bit, no tolerance


@pytest.mark.parametrize("max_batch", [1, 2, 3, 8])
def test_batched_generations_equal_each_alone(llm, max_batch):
    reqs = requests(llm)
    want = [alone(llm, r) for r in reqs]
    scheduler = Scheduler(max_batch=max_batch, max_queue=64)
    gens = [Generation(llm, r["prompt"], r["params"], seed=r["seed"], stop=r["stop"]) for r in reqs]

    async def main():
        # staggered: some together, some while others are mid-way, at every position
        return await asyncio.gather(*(through(scheduler, g, 0.002 * (i % 5)) for i, g in enumerate(gens)))

    pieces = asyncio.run(main())
    scheduler.close()
    for gen, w, p in zip(gens, want, pieces):
        assert_same(gen, w)
        assert "".join(p) == w.result.text  # the streamed pieces concatenate to the text
    stats = scheduler.stats
    assert stats["finished"] == len(reqs) and stats["cancelled"] == 0
    if max_batch > 1:
        assert stats["batch_rows"] > stats["steps"]  # some steps decoded several sequences together


def test_the_batched_step_is_used_with_the_whole_batch(llm, monkeypatch):
    """Where the model has decode_batch, the scheduler calls it with up to max_batch rows."""
    sizes = []

    def decode_batch(tokens, caches, mode="invariant"):  # [B] -> [B, V], decode's rows
        sizes.append(len(tokens))
        return np.stack([llm.model.decode(t, c) for t, c in zip(tokens, caches)])

    monkeypatch.setattr(llm.model, "decode_batch", decode_batch, raising=False)
    reqs = [dict(r, params=InferencingParams(max_tokens=6, temperature=0.0)) for r in requests(llm)[:5]]
    scheduler = Scheduler(max_batch=4)
    gens = [Generation(llm, r["prompt"], r["params"], seed=r["seed"]) for r in reqs]

    async def main():
        await asyncio.gather(*(through(scheduler, g, 0) for g in gens))

    asyncio.run(main())
    scheduler.close()
    assert max(sizes) == 4 and len(gens) - 4 >= 1  # the fifth waited for a place
    for gen, r in zip(gens, reqs):
        assert_same(gen, alone(llm, r))


def test_a_cancelled_request_leaves_the_queue_at_once_and_its_work_stops(llm):
    scheduler = Scheduler(max_batch=1, max_queue=8)
    params = InferencingParams(max_tokens=40, temperature=0.0)

    async def main():
        running = scheduler.submit_generation(Generation(llm, "The quick", params))
        queued = [scheduler.submit_generation(Generation(llm, "a", params)) for _ in range(5)]
        assert (await running.events.get())[0] == "piece"
        assert scheduler.queued == 5
        for t in queued:
            t.cancel()
        assert scheduler.queued == 0  # at once, not when their turn comes
        units = scheduler.stats["units"]
        running.cancel()
        await asyncio.sleep(0.2)
        assert scheduler.stats["units"] - units <= 1  # at most the step already in the thread
        assert not scheduler.running
        return [await t.events.get() for t in queued]

    events = asyncio.run(main())
    scheduler.close()
    assert events == [("cancelled",)] * 5
    assert scheduler.stats["cancelled"] == 6


def test_a_full_queue_answers_overloaded(llm):
    scheduler = Scheduler(max_batch=1, max_queue=2)
    params = InferencingParams(max_tokens=3, temperature=0.0)

    async def main():
        tickets = [scheduler.submit_generation(Generation(llm, "a", params)) for _ in range(2)]
        with pytest.raises(ServeError) as e:
            scheduler.submit_generation(Generation(llm, "a", params))
        assert e.value.kind == "overloaded" and e.value.headers["retry-after"] == "1"
        with pytest.raises(ServeError):  # an array request is refused whole
            scheduler.submit_generations([Generation(llm, "a", params)])
        for t in tickets:
            while (await t.events.get())[0] != "done":
                pass

    asyncio.run(main())
    scheduler.close()


def test_max_tokens_zero_finishes_without_compute(llm):
    scheduler = Scheduler()
    gen = Generation(llm, "a", InferencingParams(max_tokens=0))

    async def main():
        return await through(scheduler, gen, 0)

    assert asyncio.run(main()) == [] and gen.result.text == "" and scheduler.stats["units"] == 0
    scheduler.close()


# ----------------------------------------------------------------------------- throughput mode

THROUGHPUT_RTOL = 1e-5  # decode_batch's throughput mode: float rounding, ~1e-6 relative in float32


def near_tie(logits: np.ndarray, gap: float) -> bool:
    top2 = np.sort(np.asarray(logits, dtype=np.float64))[-2:]
    return top2[1] - top2[0] < gap


def test_throughput_mode_is_within_rounding_of_the_invariant_one(llm):
    """One gemm per matrix for the batch: logits within THROUGHPUT_RTOL of `decode`'s, the
    same greedy tokens wherever the top two logits are not within that of each other."""
    reqs = [dict(r, params=InferencingParams(max_tokens=8, temperature=0.0, repeat_penalty=1.0))
            for r in requests(llm)[:8]]
    scheduler = Scheduler(max_batch=8, mode="throughput")
    gens = [Generation(llm, r["prompt"], r["params"], seed=r["seed"]) for r in reqs]

    async def main():
        await asyncio.gather(*(through(scheduler, g, 0) for g in gens))

    asyncio.run(main())
    scheduler.close()
    assert scheduler.stats["batch_rows"] > scheduler.stats["steps"]
    for gen, r in zip(gens, reqs):
        want = alone(llm, r)
        for a, b in zip(gen.steps, want.steps):
            scale = np.max(np.abs(b.logits))
            np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=THROUGHPUT_RTOL * scale)
            if a.token != b.token:
                assert near_tie(b.logits, 2 * THROUGHPUT_RTOL * scale)
                break  # the sequences part here; the rest is not comparable
            if near_tie(b.logits, 2 * THROUGHPUT_RTOL * scale):
                break


def test_throughput_mode_through_the_server(models_root):
    """`--batch-mode throughput`: said in /info and in every answer's x-batch-mode header;
    greedy answers as refllm.infer's where no near tie occurs."""
    import httpx

    import refllm
    from refllm.logprobs import log_softmax_at
    from refllm.serve.app import ServerThread
    from refllm.serve.core import ServerConfig

    prompts = ["The capital of France is", "Water boils at", "My favourite colour is", "def add(a, b):"]
    params = InferencingParams(3, 1.0, 2**32 - 1, 0.0, 2**32 - 1, 1.0)
    with ServerThread(ServerConfig(models_dir=models_root, batch_mode="throughput")) as s:
        info = httpx.get(s.url + "/info").json()
        assert info["batch_mode"] == "throughput"

        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=600) as c:
                return await asyncio.gather(*(c.post("/generate", headers={"x-wait-for-model": "true"}, json={
                    "inputs": p, "parameters": {"max_new_tokens": 3, "details": True}}) for p in prompts))

        answers = asyncio.run(main())
    for p, r in zip(prompts, answers):
        assert r.status_code == 200 and r.headers["x-batch-mode"] == "throughput"
        gen = refllm.infer_stream("smollm2-135m-instruct", p, params, models_dir=models_root)
        gen.run()
        got = r.json()["details"]["tokens"]
        for step, token in zip(gen.steps, got):
            want = float(log_softmax_at(step.logits, [token["id"]])[0])
            assert abs(token["logprob"] - want) < 1e-3, (token, want)
            if token["id"] != step.token:
                assert near_tie(step.logits, 1e-3)
                break
        else:
            assert r.json()["generated_text"] == gen.result.text
