"""`refllm serve` under load: aggregate decode throughput at 1/2/4/8 concurrent streams,
and time-to-first-token and time-per-token under a mixed load, through HTTP.

    python bench/serve_load.py [--tokens 32] [--mixed 24] [--batch-mode invariant] [--models-dir D]

A server (`ServerThread`, max_batch 8) on loopback serves smollm2-135m-instruct. Each
stream is a TGI `/generate_stream` request, greedy, `max_new_tokens` = --tokens, on
its own prompt; a token is counted when its server-sent event arrives.

1. Throughput: N streams (N = 1, 2, 4, 8) started together; aggregate tokens/s = all
   tokens received / wall time from the first request to the last event, once per N
   after a warm-up. Beside it, the mean sequences per decode step the scheduler ran.
2. Mixed load: --mixed requests arriving as a Poisson process (mean gap 0.5 s), with
   max_new_tokens in 4..48 and prompts of 5..60 tokens, some streaming embeddings
   requests among them. Time-to-first-token (request sent -> first token event) and
   time-per-token ((last event - first event) / (tokens - 1)) of each generation;
   p50 and p99 of each.

The model-level `refllm bench --streams` (decode_batch alone, no HTTP) is issue 14b's;
this one includes the server: HTTP, SSE, tokenizing, sampling and the scheduler.
Written to bench/results/serve_load.{md,json}. On a shared machine the load average
before and after is reported beside the figures: they are of one run each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import time
from pathlib import Path

import httpx
import numpy as np

from refllm.serve.app import ServerThread
from refllm.serve.core import ServerConfig

RESULTS = Path(__file__).parent / "results"
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 1, 2, 3,", "Why is the sky blue?",
           "def fibonacci(n):", "The quick brown fox", "Water boils at", "In 1969, the first"]


async def stream(c: httpx.AsyncClient, prompt: str, tokens: int) -> dict:
    """One greedy /generate_stream request: when it was sent and when each token arrived."""
    sent = time.perf_counter()
    arrivals = []
    body = {"inputs": prompt, "parameters": {"max_new_tokens": tokens}}
    async with c.stream("POST", "/generate_stream", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.perf_counter())
    return {"sent": sent, "arrivals": arrivals}


async def throughput(url: str, n: int, tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=3600) as c:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(stream(c, PROMPTS[i % len(PROMPTS)], tokens) for i in range(n)))
    wall = max(r["arrivals"][-1] for r in runs) - t0
    total = sum(len(r["arrivals"]) for r in runs)
    return {"streams": n, "tokens": total, "seconds": wall, "tokens_per_s": total / wall}


async def mixed(url: str, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=3600) as c:
        async def one(i: int, delay: float):
            await asyncio.sleep(delay)
            if i % 6 == 5:  # an embedding request among the generations
                texts = [f"sentence {j} of request {i}" for j in range(64)]
                await c.post("/embed", content=json.dumps({"input": texts}))
                return None
            prompt = " ".join(rng.choice(PROMPTS) for _ in range(rng.randint(1, 8)))
            return await stream(c, prompt, rng.randint(4, 48))

        t, jobs = 0.0, []
        for i in range(n):
            t += rng.expovariate(2.0)  # mean gap 0.5 s
            jobs.append(one(i, t))
        return [r for r in await asyncio.gather(*jobs) if r is not None]


def percentiles(xs) -> dict:
    return {"p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99)), "n": len(xs)}


def report(result: dict) -> list[str]:
    """The markdown of a run's result."""
    rows, (before, after) = result["throughput"], (result["load_average_before"], result["load_after"])
    one = rows[0]["tokens_per_s"]
    lines = ["# `refllm serve` under load (bench/serve_load.py)", "",
             f"{result['machine']}; load average {before[0]:.1f} before, {after[0]:.1f} after; "
             f"batch mode {result['batch_mode']}; {result['tokens']} tokens a stream; one run.", "",
             "| streams | aggregate tokens/s | x one stream | sequences a decode step |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['streams']} | {r['tokens_per_s']:.3g} | {r['tokens_per_s'] / one:.2f} | "
              f"{r['sequences_per_step']:.2f} |" for r in rows]
    ttft, tpot = result["ttft_s"], result["time_per_token_s"]
    lines += ["", f"Mixed load, {result['mixed_requests']} requests (Poisson arrivals, mean gap 0.5 s, 1 in 6 a "
              f"64-text embedding):", "", "| | p50 | p99 |", "| --- | --- | --- |",
              f"| time to first token | {ttft['p50']:.3g} s | {ttft['p99']:.3g} s |",
              f"| time per token | {tpot['p50']:.3g} s | {tpot['p99']:.3g} s |"]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--mixed", type=int, default=24)
    ap.add_argument("--batch-mode", default="invariant")
    ap.add_argument("--models-dir")
    args = ap.parse_args()

    load_before = os.getloadavg()
    config = ServerConfig(models_dir=args.models_dir, max_batch=8, batch_mode=args.batch_mode)
    with ServerThread(config) as server:
        stats = server.engine.stats
        asyncio.run(throughput(server.url, 1, 4))  # warm-up: loads the model
        rows = []
        for n in (1, 2, 4, 8):
            steps, batch_rows = stats["steps"], stats["batch_rows"]
            row = asyncio.run(throughput(server.url, n, args.tokens))
            row["sequences_per_step"] = (stats["batch_rows"] - batch_rows) / max(1, stats["steps"] - steps)
            rows.append(row)
            print(f"{n} streams: {row['tokens_per_s']:.1f} tokens/s ({row['sequences_per_step']:.2f} a step)", flush=True)
        runs = asyncio.run(mixed(server.url, args.mixed))
    load_after = os.getloadavg()
    ttft = [r["arrivals"][0] - r["sent"] for r in runs if r["arrivals"]]
    tpot = [(r["arrivals"][-1] - r["arrivals"][0]) / (len(r["arrivals"]) - 1) for r in runs if len(r["arrivals"]) > 1]
    result = {"throughput": rows, "ttft_s": percentiles(ttft), "time_per_token_s": percentiles(tpot),
              "batch_mode": args.batch_mode, "tokens": args.tokens, "mixed_requests": args.mixed,
              "load_average_before": load_before, "load_after": load_after,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    lines = report(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_load.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "serve_load.json").write_text(json.dumps(result, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
