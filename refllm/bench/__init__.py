"""`refllm bench`: how fast the NumPy path is, beside the peers, in one run.

    prefill   tokens/s of one forward pass over a 128-token prompt (a fresh cache)
    decode    tokens/s of 128 greedy steps after that prompt, batch 1
    embed     sentences/s of short sentences, one at a time and 32 at a time
    memory    peak resident memory of `refllm infer`, against the float32 weights
    streams   aggregate decode tokens/s of 1, 2, 4, 8 sequences decoded together by
              `Llama.decode_batch`, in its invariant and throughput modes (refllm alone)

for refllm (NumPy) and every peer that is installed: transformers (float32 LlamaForCausalLM),
llama.cpp through llama-cpp-python on an F32 GGUF of the same safetensors
(`refllm.weights.hf_to_gguf`), and sentence-transformers on the same embedding model
directory. Each figure is the median of `rounds` timed runs after one untimed warm-up
run, the rounds of the engines taken in turn, A B C A B C ..., so that a burst of load
on a shared machine hits all of them. Each engine is loaded in a process of its own, as
a user runs it (`EngineProcess`; `--in-process` puts them all in one): torch, llama.cpp
and refllm's malloc tuning each change their whole process. All engines get the same
token ids, use every core, and pick the next token by the same greedy argmax of their
float32 logits, so the comparison is the model's forward pass alone.

The physics (as gpt-fast reports it): decoding one token reads every weight once, so

    achieved read bandwidth = decode tokens/s x bytes read per token
    bandwidth floor         = machine read bandwidth / bytes read per token   (tokens/s)

with the machine's read bandwidth measured by a streaming read of a 512 MiB array,
sampled between the engines' decode rounds: the best sample, or the fastest decode
round when that read faster (`runner.settle_bandwidth`), so no decode figure exceeds it.
Prefill is compute-bound and reports GFLOP/s.

The package, in the order data flows:

    workloads.py   the prompt, the sentences, the engines' and tasks' names
    probes.py      the machine: read bandwidth, the cost model, peak RSS
    engines.py     the engine adapters and the timing of one round
    isolation.py   loading the engines, each in a process of its own
    runner.py      the whole run, in turns, into a Report
    report.py      the markdown table and the chart
    cli.py         `refllm bench` (`add_bench_arguments`, `bench_from_args`)

Used by `refllm bench` and by the pytest-benchmark suites in `bench/`, which time the
same engine methods; the names below are the package's public surface.
"""

from ..weights.hf_to_gguf import ensure_f32_gguf, permute_for_gguf, write_f32_gguf
from .cli import _pick, add_bench_arguments, bench_from_args, main
from .engines import (LlamaCppLLM, RefllmEmbedder, RefllmLLM, SentenceTransformersEmbedder, TransformersLLM,
                      greedy_tokens, time_decode, time_embed, time_prefill, time_task)
from .isolation import (EMBED_FACTORIES, FACTORIES, LLM_FACTORIES, EngineProcess, close_engines, load_engines,
                        load_peer)
from .probes import (ReadBandwidth, infer_peak_rss, infer_peak_rss_both, llama_costs, machine_info, n_threads,
                     read_bandwidth)
from .report import bandwidth_share, format_report, format_streams, write_chart
from .runner import Report, Result, run, settle_bandwidth
from .workloads import (ALL_ENGINES, ALL_TASKS, DECODE_TOKENS, DEFAULT_TASKS, EMBED_BATCH, EMBED_PASSES, LLAMA_CPP,
                        PROMPT, PROMPT_TOKENS, REFLLM, SENTENCE_TRANSFORMERS, SENTENCES, STREAM_COUNTS, STREAM_MODES,
                        STREAM_STEPS, TRANSFORMERS, parse_streams_task, prompt_ids, streams_task)

__all__ = [name for name in dir() if not name.startswith("__")]
