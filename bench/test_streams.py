"""Concurrent streams: aggregate decode tokens/s of n sequences stepped together by
`Llama.decode_batch`, in its invariant mode (each row bit for bit the single-sequence
step) and its throughput mode (one matrix-matrix product per matrix).

    pytest bench/test_streams.py --benchmark-columns=median,min,max,rounds

The same rounds as `refllm bench --streams 1,2,4,8`, timed here by pytest-benchmark:
each round is STREAM_STEPS steps of all n streams after the 128-token prompt (prefilled
once, untimed, its cache copied to every stream). The session's table adds the streams
table of `refllm.bench.format_streams`: each count's aggregate as a multiple of one
stream in the invariant mode.
"""

from __future__ import annotations

import pytest

from refllm import bench

from .conftest import engine, record


@pytest.fixture(scope="module")
def refllm_llm(llama_dir):
    return engine("llm", bench.REFLLM, lambda: bench.LLM_FACTORIES[bench.REFLLM](llama_dir, bench.n_threads()))


@pytest.mark.parametrize("mode", bench.STREAM_MODES)
@pytest.mark.parametrize("n", bench.STREAM_COUNTS)
def test_streams(benchmark, refllm_llm, llama_dir, rounds, n, mode):
    ids = bench.prompt_ids(llama_dir)
    benchmark.group = f"decode_batch, {bench.STREAM_STEPS} steps of n streams"
    benchmark.pedantic(refllm_llm.decode_streams, setup=lambda: ((*refllm_llm.stream_caches(ids, n), mode), {}),
                       rounds=rounds, warmup_rounds=1, iterations=1)
    result = record(bench.streams_task(n, mode), bench.REFLLM, n * bench.STREAM_STEPS, "tok/s", benchmark)
    benchmark.extra_info["streams"] = n
    assert result.rate > 0
