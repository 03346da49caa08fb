"""`refllm bench`: how fast the NumPy path is, beside the peers, in one run.

    prefill   tokens/s of one forward pass over a 128-token prompt (a fresh cache)
    decode    tokens/s of 128 greedy steps after that prompt, batch 1
    embed     sentences/s of short sentences, one at a time and 32 at a time

for refllm (NumPy) and every peer that is installed: transformers (float32 LlamaForCausalLM),
llama.cpp through llama-cpp-python on an F32 GGUF written here from the same
safetensors, and sentence-transformers on the same embedding model directory. Each
figure is the median of `rounds` timed runs after one untimed warm-up run (`refllm
bench` takes the rounds of the engines in turn, A B C A B C ..., so that a burst of
load on a shared machine hits all of them). Each engine is loaded in a process of its
own, as a user runs it (`EngineProcess`; `--in-process` puts them all in one): torch,
llama.cpp and refllm's malloc tuning each change their whole process. All engines get
the same token ids, use every core, and pick the next token by the same greedy argmax
of their float32 logits, so the comparison is the model's forward pass alone.

The physics (as gpt-fast reports it): decoding one token reads every weight once (the
tied lm_head included; the embedding row gather is negligible) plus the KV cache, so

    achieved read bandwidth = decode tokens/s x bytes read per token
    bandwidth floor         = machine read bandwidth / bytes read per token   (tokens/s)

and the machine's read bandwidth is measured here, by a streaming read of a 512 MiB
array (one thread per core, each over its own slice; NumPy's sum and a one-thread BLAS
matrix-vector product as readers), sampled between the engines' decode rounds: the
median sample. Prefill is compute-bound and reports GFLOP/s (2 x multiply-adds of the
projections and the attention). `memory` runs `refllm infer` in a child process and
reads its peak resident set size (`wait4`'s ru_maxrss), against the float32 weight size.

Used by `refllm bench` (`add_bench_arguments`, `bench_from_args`) and by the
pytest-benchmark suites in `bench/`, which time the same engine methods.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .weights.hf_to_gguf import ensure_f32_gguf, permute_for_gguf, write_f32_gguf  # noqa: F401 (re-exported)

PROMPT_TOKENS = 128
DECODE_TOKENS = 128
EMBED_BATCH = 32
EMBED_PASSES = 4  # passes over SENTENCES per timed round (a round of one batch is too short to time well)

# A fixed English prompt, long enough for 128 tokens with any sensible BPE vocabulary.
PROMPT = (
    "The history of computing is a story of machines that learned to remember. Early "
    "calculators could add and multiply, but they forgot each result as soon as it was "
    "read. The stored-program computer changed that: instructions and data lived in the "
    "same memory, and a program could rewrite itself. Over the following decades memory "
    "grew from a few thousand words of magnetic core to billions of bytes of dynamic RAM, "
    "while the time to fetch a word shrank far more slowly than the time to compute with "
    "it. Today the speed of many programs, including the language models that answer our "
    "questions, is set less by arithmetic than by how fast weights can be streamed from "
    "memory into the processor. A model with one hundred million parameters in single "
    "precision must read four hundred megabytes for every token it writes, and so the "
    "memory bus, not the multiplier, decides how quickly the words appear on the screen."
)

# Short sentences, as a search index or a chat memory embeds them.
SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "The cat sits outside.",
    "A new movie is so great.", "The new movie is awesome.", "How do I reset my password?",
    "What is the weather like in Paris today?", "Serverless functions start in milliseconds.",
    "The quick brown fox jumps over the lazy dog.", "I forgot my umbrella at the station.",
    "Please send me the quarterly report by Friday.", "Water boils at one hundred degrees Celsius.",
    "She plays the piano every evening.", "The train to Berlin is delayed by ten minutes.",
    "Neural networks learn from examples.", "My phone battery dies too quickly.",
    "The museum opens at nine in the morning.", "He ordered a coffee with oat milk.",
    "Spin runs WebAssembly components.", "The library closes early on Sundays.",
    "Our team won the final match.", "Add two cups of flour and stir gently.",
    "The river flooded after the storm.", "Can you recommend a good book on history?",
    "Memory bandwidth limits token generation.",
]


# ------------------------------------------------------------------ results

@dataclass
class Result:
    """One (task, engine) measurement: `seconds` of each timed round for `units` units."""

    task: str  # "prefill", "decode", "embed b1", "embed b32"
    engine: str
    units: int  # tokens or sentences per round
    unit: str  # "tok/s" or "sent/s"
    seconds: list[float] = field(default_factory=list)
    skipped: str | None = None  # why the engine was not measured

    @property
    def rate(self) -> float:  # units/s of the median round
        return self.units / statistics.median(self.seconds) if self.seconds else float("nan")


@dataclass
class Report:
    results: list[Result]
    machine: dict
    read_bandwidth: float | None = None  # bytes/s
    decode_bytes_per_token: float | None = None
    prefill_flops: float | None = None  # per prompt
    weight_bytes: int | None = None  # float32 bytes of the Llama's weights
    peak_rss: int | None = None  # bytes, `refllm infer` as a user runs it
    peak_rss_numpy: int | None = None  # bytes, `refllm infer --backend numpy` (no CUDA probe)
    peak_rss_note: str = ""
    isolated: bool = False  # each engine timed in a process of its own

    def rate(self, task: str, engine: str) -> float | None:
        for r in self.results:
            if r.task == task and r.engine == engine and r.seconds:
                return r.rate
        return None

    def to_json(self) -> dict:
        return {**asdict(self), "rates": {f"{r.task} / {r.engine}": r.rate for r in self.results if r.seconds}}


REFLLM = "refllm (NumPy)"
LLAMA_CPP = "llama.cpp F32"
TRANSFORMERS = "transformers f32"
SENTENCE_TRANSFORMERS = "sentence-transformers"


def n_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info() -> dict:
    info = {"cpu": _cpu_name(), "cores": n_threads(), "python": platform.python_version(), "numpy": np.__version__}
    try:
        from threadpoolctl import threadpool_info

        blas = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        blas.sort(key=lambda p: "numpy" not in str(p.get("filepath", "")))  # NumPy's own BLAS first
        if blas:
            b = blas[0]
            info["blas"] = f"{b.get('internal_api')} {b.get('version')} ({b.get('architecture')}, {b.get('num_threads')} threads)"
    except ImportError:
        pass
    try:
        info["load average"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------ physics

class ReadBandwidth:
    """The machine's streaming read bandwidth, sampled in bytes/s.

    An array far larger than the caches, on huge pages like the Llama's weights
    (`WeightArena`: on 4 KiB pages the TLB walks cost a fifth of the rate), is read by
    three readers: NumPy's sum and a one-thread BLAS matrix-vector product, each run by
    one thread per core over its own slice (NumPy and the BLAS release the GIL), and one
    matrix-vector product over the whole array on the BLAS's own threads, the kernel a
    decode step streams its weights with. The array is column-major [n, 1024], so a
    thread's slice of columns is contiguous. `sample()` reads it once with each and
    returns the fastest rate: any reader that reaches a rate proves the memory delivers
    it. (NumPy's pairwise float32 sum tops out near 14 GB/s a core; the products reach
    what the memory gives.)

    The bandwidth a shared VM gets moves by a third from minute to minute (26 to 43
    GB/s seen on one machine in one hour), so `run` samples it between the decode rounds
    of the engines, in the same turns, and reports the median: the bandwidth of the
    minutes the engines ran in.
    """

    def __init__(self, nbytes: int = 512 * 2**20, threads: int | None = None):
        from .checkpoint import WeightArena

        self.threads = threads or n_threads()
        self.a = WeightArena().empty((max(nbytes // 4096, 1), 1024), np.float32, order="F")  # [n, 1024]
        self.a[...] = 1  # touched once, so the pages exist
        self.slices = [self.a[:, part] for part in np.array_split(np.arange(1024), self.threads)]  # contiguous
        x = np.ones(1024, dtype=np.float32)  # [1024]
        self.readers = {  # name -> read(pool), one pass over the array
            "NumPy sum, a thread per core": lambda pool: list(pool.map(np.sum, self.slices)),
            "BLAS gemv on 1 thread, a thread per core": lambda pool: list(pool.map(lambda s: s @ x[: s.shape[1]], self.slices)),
            "BLAS gemv on the BLAS's threads": lambda pool: self.a @ x,
        }
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # without it the per-core BLAS reader would run threads x BLAS threads
            del self.readers["BLAS gemv on 1 thread, a thread per core"]
            threadpool_limits = None
        self.threadpool_limits = threadpool_limits
        self.samples: list[float] = []

    def sample(self) -> float:
        best = float("inf")
        with ThreadPoolExecutor(self.threads) as pool:
            for name, read in self.readers.items():
                limits = self.threadpool_limits(1) if name.startswith("BLAS gemv on 1 thread") else None
                try:
                    t0 = time.perf_counter()
                    read(pool)
                    best = min(best, time.perf_counter() - t0)
                finally:
                    if limits is not None:
                        limits.restore_original_limits()
        self.samples.append(self.a.nbytes / best)
        return self.samples[-1]

    def median(self) -> float:
        return statistics.median(self.samples)


def read_bandwidth(nbytes: int = 512 * 2**20, passes: int = 7, threads: int | None = None) -> float:
    """The median of `passes` samples of `ReadBandwidth`, after one warm-up pass."""
    probe = ReadBandwidth(nbytes, threads)
    probe.sample()
    probe.samples.clear()
    for _ in range(passes):
        probe.sample()
    return probe.median()


def llama_costs(config, prompt_tokens: int, decode_tokens: int) -> tuple[float, float, int]:
    """(bytes read per decoded token, FLOPs of a prefill, float32 weight bytes) of a Llama.

    Weights: every projection of every layer, the norms, and the lm_head (the embedding
    matrix again when tied: read whole by the head, once per token). KV cache: K and V of
    every earlier position, averaged over the decode steps.
    """
    c = config
    D, F, V, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    NH, NKV, HD = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    per_layer = D * (NH + 2 * NKV) * HD + NH * HD * D + 3 * D * F  # projection weights
    weights_read = L * (per_layer + 2 * D) + D + V * D  # + norms, final norm, lm_head
    stored = weights_read + (0 if c.tie_word_embeddings else V * D)  # + a separate embedding
    mean_pos = prompt_tokens + (decode_tokens - 1) / 2
    kv_read = L * 2 * NKV * HD * mean_pos
    T = prompt_tokens
    prefill_flops = 2 * T * L * per_layer + 2 * V * D  # projections; the head for the last position
    prefill_flops += L * 2 * 2 * NH * HD * T * (T + 1) / 2  # q k^T and p v over the causal triangle
    return 4.0 * (weights_read + kv_read), float(prefill_flops), 4 * stored


# The child reports its own peak: on Linux /proc/self/status VmHWM, the high-water mark
# of its own address space since exec. (The parent's view, wait4's ru_maxrss, also
# counts the address space the child had before exec, the parent's copy when forked
# from a big process such as a benchmark with three models loaded.)
_PEAK_RSS_CHILD = """
import sys
from refllm.cli import main
code = main(sys.argv[1:])
try:
    status = open("/proc/self/status").read()
    peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
except (OSError, IndexError):
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print("peak-rss", peak, file=sys.stderr)
sys.exit(code)
"""


def infer_peak_rss(model: str, models_dir: str | None = None, max_tokens: int = 32, backend: str | None = None) -> int:
    """Peak resident set size in bytes of `refllm infer` (a child process) on `model`."""
    args = ["infer", "Tell me about memory bandwidth.", "--model", model, "--max-tokens", str(max_tokens),
            "--seed", "0", "--no-pull"]
    if models_dir:
        args += ["--models-dir", str(models_dir)]
    if backend:
        args += ["--backend", backend]
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS_CHILD, *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, errors="replace")
    lines = [line for line in done.stderr.splitlines() if line.startswith("peak-rss ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"refllm infer failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    return int(lines[-1].split()[1])


def infer_peak_rss_both(model: str, models_dir=None) -> tuple[int, int]:
    """(default backend, --backend numpy): the default resolves the backend by asking
    torch for CUDA when torch is installed, and importing torch is part of its peak."""
    return infer_peak_rss(model, models_dir), infer_peak_rss(model, models_dir, backend="numpy")


# ------------------------------------------------------------------ decoder engines
#
# Each engine: `prefill(ids) -> next token` (greedy, from an empty state) and
# `step(token) -> next token` (one decode step on the state prefill left).

class RefllmLLM:
    name = REFLLM

    def __init__(self, model_dir):
        from .llama import Llama
        from .malloc import retain_freed_memory

        retain_freed_memory()  # as refllm's CLI and server run the model (refllm.malloc)
        self.model = Llama.from_pretrained(model_dir, backend="numpy")
        self.cache = None

    def prefill(self, ids) -> int:
        from .generate import prefill

        self.cache = self.model.new_cache(len(ids) + DECODE_TOKENS + 1)
        return int(np.argmax(prefill(self.model, ids, self.cache)))

    def step(self, token: int) -> int:
        from .generate import decode_one

        return int(np.argmax(decode_one(self.model, token, self.cache)))


def _quiet_transformers() -> None:
    """No loading progress bars or warnings from transformers in the benchmark's output."""
    try:
        from transformers.utils import logging

        logging.disable_progress_bar()
        logging.set_verbosity_error()
    except ImportError:
        pass


class TransformersLLM:
    name = TRANSFORMERS

    def __init__(self, model_dir, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        _quiet_transformers()
        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.past = None

    def prefill(self, ids) -> int:
        torch = self.torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([list(ids)]), use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def step(self, token: int) -> int:
        torch = self.torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([[token]]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())


class LlamaCppLLM:
    name = LLAMA_CPP

    def __init__(self, gguf_path, threads: int, n_ctx: int = 512):
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                   n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    @classmethod
    def from_model_dir(cls, model_dir, threads: int) -> "LlamaCppLLM":
        """On the F32 GGUF of `model_dir` (written on first use); ModuleNotFoundError
        first when llama-cpp-python is not installed."""
        import llama_cpp  # noqa: F401

        return cls(ensure_f32_gguf(model_dir), threads)

    def close(self) -> None:
        """Free the model now: llama-cpp-python's own __del__ fails at interpreter exit."""
        self.llm.close()

    def _next(self) -> int:
        # The last position's logits, read in place (`eval` keeps none without logits_all).
        logits = self.llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.n_vocab,))))

    def prefill(self, ids) -> int:
        self.llm.reset()
        self.llm.eval(list(ids))
        return self._next()

    def step(self, token: int) -> int:
        self.llm.eval([token])
        return self._next()


def time_prefill(engine, ids) -> float:
    t0 = time.perf_counter()
    engine.prefill(ids)
    return time.perf_counter() - t0


def time_decode(engine, ids, n: int = DECODE_TOKENS) -> float:
    """Prefill (untimed), then the seconds of `n` greedy decode steps."""
    token = engine.prefill(ids)
    t0 = time.perf_counter()
    for _ in range(n):
        token = engine.step(token)
    return time.perf_counter() - t0


def time_task(engine, task: str, ids=None) -> float:
    """Seconds of one timed round of `task` ("prefill", "decode", "embed b1", "embed b32")."""
    if task == "prefill":
        return time_prefill(engine, ids)
    if task == "decode":
        return time_decode(engine, ids)
    if task.startswith("embed b"):
        return time_embed(engine, SENTENCES, int(task.removeprefix("embed b")))
    raise ValueError(f"unknown task {task!r}")


def greedy_tokens(engine, ids, n: int) -> list[int]:
    out = [engine.prefill(ids)]
    for _ in range(n - 1):
        out.append(engine.step(out[-1]))
    return out


def prompt_ids(model_dir, n: int = PROMPT_TOKENS) -> list[int]:
    """The first `n` token ids of PROMPT (BOS included), repeated if the text is short."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")).encode(PROMPT, add_special_tokens=True).ids
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


# ------------------------------------------------------------------ embedding engines

class RefllmEmbedder:
    name = REFLLM

    def __init__(self, model_dir):
        from .embeddings import Embedder
        from .malloc import retain_freed_memory

        retain_freed_memory()  # as refllm's CLI and server run the model (refllm.malloc)
        self.embedder = Embedder.from_dir(model_dir, backend="numpy")

    def embed(self, texts):  # N texts -> [N, H]
        return self.embedder.embed_array(texts, chunk_size=len(texts))


class SentenceTransformersEmbedder:
    name = SENTENCE_TRANSFORMERS

    def __init__(self, model_dir, threads: int):
        import torch
        from sentence_transformers import SentenceTransformer

        _quiet_transformers()
        torch.set_num_threads(threads)
        self.model = SentenceTransformer(str(model_dir), device="cpu")

    def embed(self, texts):  # N texts -> [N, H]
        return self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=False)


def time_embed(engine, sentences, batch: int, passes: int = EMBED_PASSES) -> float:
    """Seconds to embed all `sentences`, `batch` at a time, `passes` times."""
    t0 = time.perf_counter()
    for _ in range(passes):
        for i in range(0, len(sentences), batch):
            engine.embed(sentences[i : i + batch])
    return time.perf_counter() - t0


# ------------------------------------------------------------------ loading the peers

def load_peer(name: str, factory: Callable[[], object]):
    """(engine, None) or (None, why it is skipped): a peer that is not installed or fails
    to load is reported, never fatal."""
    try:
        return factory(), None
    except ModuleNotFoundError as e:
        return None, f"not installed ({e.name or e})"
    except ImportError as e:
        return None, f"cannot be imported: {str(e)[:200]}"
    except Exception as e:  # a peer's own failure: say what it was
        return None, f"failed to load: {type(e).__name__}: {str(e)[:200]}"


LLM_FACTORIES = {  # name -> (model_dir, threads) -> engine
    REFLLM: lambda model_dir, threads: RefllmLLM(model_dir),
    LLAMA_CPP: lambda model_dir, threads: LlamaCppLLM.from_model_dir(model_dir, threads),
    TRANSFORMERS: lambda model_dir, threads: TransformersLLM(model_dir, threads),
}
EMBED_FACTORIES = {
    REFLLM: lambda model_dir, threads: RefllmEmbedder(model_dir),
    SENTENCE_TRANSFORMERS: lambda model_dir, threads: SentenceTransformersEmbedder(model_dir, threads),
}
FACTORIES = {"llm": LLM_FACTORIES, "embed": EMBED_FACTORIES}  # kind -> its engines' factories


def load_engines(kind: str, model_dir, engines, threads: int, isolate: bool = False):
    """[(name, engine or None, skip reason)] for the engines of `kind` ("llm" or
    "embed") asked for; with `isolate`, each is an `EngineProcess` (loaded and timed in
    a process of its own)."""
    factories = FACTORIES[kind]
    if isolate:
        return [(name, *EngineProcess.start(kind, name, model_dir, threads)) for name in engines if name in factories]
    return [(name, *load_peer(name, lambda f=factories[name]: f(model_dir, threads)))
            for name in engines if name in factories]


def close_engines(loaded) -> None:
    for _, engine, _ in loaded:
        if engine is not None and hasattr(engine, "close"):
            engine.close()


# ------------------------------------------------------------------ one process per engine
#
# Engines in one process disturb each other: refllm tunes glibc's malloc for the whole
# process (refllm/malloc.py), torch starts its own thread pools and allocator, and
# llama.cpp its own threads. A user runs one engine per process, so `refllm bench` does
# the same: each engine is loaded in a child process of its own, which times the
# parent's requests one round at a time (the rounds still alternate A B C A B C, and
# only one process works at a time).

class EngineProcess:
    """An engine loaded in a child process (multiprocessing "spawn": a fresh
    interpreter, none of the parent's imports). `time(task)` asks it for one timed
    round and returns the child's own perf_counter seconds; `close()` ends it."""

    def __init__(self, process, conn):
        self.process, self.conn = process, conn

    @classmethod
    def start(cls, kind: str, name: str, model_dir, threads: int):
        """(EngineProcess, None), or (None, why the engine is skipped), as `load_peer`."""
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_engine_process_main, args=(child, kind, name, str(model_dir), threads),
                              name=f"refllm bench: {name}", daemon=True)
        process.start()
        child.close()
        try:
            skipped = parent.recv()  # None once the engine is loaded
        except EOFError:  # it died before it could say why (a crash in native code)
            skipped = ""  # no reason given: its exit code is the reason, below
        if skipped is not None:
            process.join(5)
            return None, skipped or f"failed to load: its process exited with code {process.exitcode}"
        return cls(process, parent), None

    def time(self, task: str) -> float:
        try:
            self.conn.send(task)
            ok, value = self.conn.recv()
        except (EOFError, OSError):  # it died (the pipe is closed or reset)
            self.process.join(5)
            raise RuntimeError(f"{self.process.name}: its process exited with code {self.process.exitcode}") from None
        if not ok:
            raise RuntimeError(f"{self.process.name}: {value}")
        return value

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
        self.conn.close()


def _engine_process_main(conn, kind: str, name: str, model_dir: str, threads: int) -> None:
    """The child's loop: load the engine, say so (None, or the reason it is skipped),
    then answer each task name with (True, seconds) or (False, the error) until None."""
    engine, skipped = load_peer(name, lambda: FACTORIES[kind][name](model_dir, threads))
    conn.send(skipped)
    if engine is None:
        return
    ids = prompt_ids(model_dir) if kind == "llm" else None
    try:
        while (task := conn.recv()) is not None:
            try:
                conn.send((True, time_task(engine, task, ids)))
            except Exception as e:
                conn.send((False, f"{type(e).__name__}: {str(e)[:300]}"))
    except EOFError:  # the parent went away
        pass
    finally:
        if hasattr(engine, "close"):
            engine.close()


# ------------------------------------------------------------------ the whole run

ALL_ENGINES = (REFLLM, LLAMA_CPP, TRANSFORMERS, SENTENCE_TRANSFORMERS)
ALL_TASKS = ("prefill", "decode", "embed", "memory")


def run(llama_dir=None, minilm_dir=None, *, rounds: int = 5, engines=ALL_ENGINES, tasks=ALL_TASKS,
        models_dir=None, llm_name: str | None = None, isolate: bool = True, log=print) -> Report:
    """Measure everything asked for; a missing model directory skips its tasks. With
    `isolate` (the default) each engine runs in its own process (`EngineProcess`);
    without it, all of them in this one."""
    threads = n_threads()
    report = Report(results=[], machine=machine_info(), isolated=isolate)
    log(f"# machine: {report.machine}")
    probe = None
    if llama_dir is None or "decode" not in tasks:
        log("# measuring read bandwidth ...")
        report.read_bandwidth = read_bandwidth()
        log(f"# read bandwidth: {report.read_bandwidth / 1e9:.1f} GB/s")
    else:
        probe = ReadBandwidth()  # sampled between the decode rounds

    if llama_dir is not None:
        from .config import LlamaConfig

        config = LlamaConfig.from_file(Path(llama_dir) / "config.json")
        report.decode_bytes_per_token, report.prefill_flops, report.weight_bytes = llama_costs(
            config, PROMPT_TOKENS, DECODE_TOKENS)
    if llama_dir is not None and ({"prefill", "decode"} & set(tasks)):
        log("# loading the decoders ...")
        loaded = load_engines("llm", llama_dir, engines, threads, isolate)
        try:
            _measure_interleaved(_jobs(loaded, [t for t in ("prefill", "decode") if t in tasks], prompt_ids(llama_dir)),
                                 rounds, report, log, probe={"decode": probe})
        finally:
            close_engines(loaded)
        del loaded
    if probe is not None:
        report.read_bandwidth = probe.median() if probe.samples else read_bandwidth()
        log(f"# read bandwidth: {report.read_bandwidth / 1e9:.1f} GB/s (median of {len(probe.samples)} samples "
            "between the decode rounds)")
        del probe

    if minilm_dir is not None and "embed" in tasks:
        log("# loading the embedders ...")
        loaded = load_engines("embed", minilm_dir, engines, threads, isolate)
        try:
            _measure_interleaved(_jobs(loaded, ["embed b1", f"embed b{EMBED_BATCH}"]), rounds, report, log)
        finally:
            close_engines(loaded)
        del loaded

    if "memory" in tasks and llm_name is not None:
        log("# measuring the peak memory of `refllm infer` ...")
        try:
            report.peak_rss, report.peak_rss_numpy = infer_peak_rss_both(llm_name, models_dir)
        except Exception as e:
            report.peak_rss_note = f"not measured: {e}"
    return report


def _jobs(loaded, tasks, ids=None) -> dict:
    """{task: [(Result, engine or None, timed round)]} for `_measure_interleaved`."""
    def timed(engine, task):
        if isinstance(engine, EngineProcess):
            return lambda: engine.time(task)
        return lambda: time_task(engine, task, ids)

    units = {"prefill": (PROMPT_TOKENS, "tok/s"), "decode": (DECODE_TOKENS, "tok/s")}
    jobs = {}
    for task in tasks:
        n, unit = units.get(task, (EMBED_PASSES * len(SENTENCES), "sent/s"))
        jobs[task] = [(Result(task, name, n, unit, skipped=skipped), engine, timed(engine, task))
                      for name, engine, skipped in loaded]
    return jobs


def _measure_interleaved(jobs: dict, rounds: int, report: Report, log, probe: dict | None = None) -> None:
    """For each task, one warm-up round per engine, then the timed rounds in turn
    (engine A, B, C, A, B, C, ...): on a shared machine a burst of load falls on every
    engine alike, and the ratios of one run stay fair. `probe[task]`, when given, is a
    `ReadBandwidth` sampled once per turn (A, B, C, probe, A, B, C, probe, ...)."""
    for task, entries in jobs.items():
        live = [(result, timed) for result, engine, timed in entries if engine is not None]
        sample = (probe or {}).get(task)
        for _, timed in live:
            timed()  # warm-up
        if sample is not None and live:
            sample.sample()
            sample.samples.clear()  # the warm-up pass
        for _ in range(rounds):
            for result, timed in live:
                result.seconds.append(timed())
            if sample is not None and live:
                sample.sample()
        for result, engine, _ in entries:
            report.results.append(result)
            what = f"{result.rate:8.1f} {result.unit}" if engine is not None else f"skipped: {result.skipped}"
            log(f"# {task:9} {result.engine:22} {what}")


# ------------------------------------------------------------------ the table and the chart

def format_report(report: Report) -> str:
    """The markdown table: each engine's rate, refllm's ratio to it, and the physics."""
    lines = []
    m = report.machine
    lines.append(f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('blas', 'BLAS unknown')}; "
                 f"load average {m.get('load average', '?')}.")
    bw = report.read_bandwidth
    bpt = report.decode_bytes_per_token
    if bw:
        lines.append(f"Measured read bandwidth: {bw / 1e9:.1f} GB/s (streaming reads of 512 MiB on huge pages, "
                     f"{m.get('cores')} threads, the fastest of three readers; the median sample)"
                     + (f"; decode reads {bpt / 1e6:.0f} MB a token, so the bandwidth floor is "
                        f"{bw / bpt:.1f} tok/s." if bpt else "."))
    lines.append("Each engine ran in a process of its own." if report.isolated else
                 "All engines ran in one process (`--in-process`).")
    lines.append("")
    lines.append("| task | engine | median | refllm ÷ engine | physics |")
    lines.append("| --- | --- | ---: | ---: | --- |")
    labels = {"prefill": f"prefill ({PROMPT_TOKENS}-token prompt)", "decode": f"decode ({DECODE_TOKENS} tokens, batch 1)",
              "embed b1": "embeddings, batch 1", f"embed b{EMBED_BATCH}": f"embeddings, batch {EMBED_BATCH}"}
    task_order = {t: i for i, t in enumerate(labels)}
    engine_order = {e: i for i, e in enumerate(ALL_ENGINES)}
    for r in sorted(report.results, key=lambda r: (task_order.get(r.task, 99), engine_order.get(r.engine, 99))):
        label = labels.get(r.task, r.task)
        if not r.seconds:
            lines.append(f"| {label} | {r.engine} | skipped: {r.skipped} | | |")
            continue
        ours = report.rate(r.task, REFLLM)
        ratio = "" if r.engine == REFLLM or ours is None else f"{ours / r.rate:.2f}×"
        physics = ""
        if r.task == "decode" and bpt:
            achieved = r.rate * bpt
            physics = f"{achieved / 1e9:.1f} GB/s" + (f" ({achieved / bw:.0%} of measured)" if bw else "")
        elif r.task == "prefill" and report.prefill_flops:
            physics = f"{r.rate / PROMPT_TOKENS * report.prefill_flops / 1e9:.0f} GFLOP/s"
        lines.append(f"| {label} | {r.engine} | {r.rate:.1f} {r.unit} | {ratio} | {physics} |")
    if report.peak_rss is not None and report.weight_bytes:
        w = report.weight_bytes
        lines.append("")
        lines.append(f"Peak resident memory of `refllm infer` (default model): {report.peak_rss / 1e6:.0f} MB = "
                     f"{report.peak_rss / w:.2f}× the {w / 1e6:.0f} MB of float32 weights")
        if report.peak_rss_numpy is not None and report.peak_rss > 1.05 * report.peak_rss_numpy:
            lines[-1] += (f"; with `--backend numpy` {report.peak_rss_numpy / 1e6:.0f} MB = {report.peak_rss_numpy / w:.2f}× "
                          f"(the default backend's CUDA probe imported torch).")
        else:
            lines[-1] += "."
    elif report.peak_rss_note:
        lines.append("")
        lines.append(f"Peak resident memory of `refllm infer`: {report.peak_rss_note}")
    return "\n".join(lines)


def write_chart(report: Report, path) -> Path | None:
    """A PNG: decode and prefill tokens/s of each engine, decode against the bandwidth floor."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    colours = {REFLLM: "#2b6cb0", LLAMA_CPP: "#718096", TRANSFORMERS: "#dd6b20"}
    for ax, task in zip(axes, ("decode", "prefill")):
        rows = [r for r in report.results if r.task == task and r.seconds]
        names = [r.engine for r in rows]
        rates = [r.rate for r in rows]
        bars = ax.barh(names, rates, color=[colours.get(n, "#4a5568") for n in names])
        ax.bar_label(bars, fmt="%.0f", padding=3, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("tokens/s")
        title = f"decode, batch 1 ({DECODE_TOKENS} tokens)" if task == "decode" else f"prefill ({PROMPT_TOKENS}-token prompt)"
        if task == "decode" and report.read_bandwidth and report.decode_bytes_per_token:
            floor = report.read_bandwidth / report.decode_bytes_per_token
            ax.axvline(floor, color="#c53030", linestyle="--", linewidth=1.2)
            ax.text(floor, len(rows) - 0.5, f" bandwidth floor\n {floor:.0f} tok/s\n ({report.read_bandwidth / 1e9:.0f} GB/s)",
                    color="#c53030", fontsize=7, va="bottom")
            ax.set_xlim(0, max(rates + [floor]) * 1.35)
        elif rates:
            ax.set_xlim(0, max(rates) * 1.2)
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"SmolLM2-135M float32 on {report.machine.get('cores')} cores of {report.machine.get('cpu')}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ the command line

def add_bench_arguments(parser) -> None:
    parser.add_argument("--models-dir", help="the models root (default: $REFLLM_MODELS_DIR, ./.spin/ai-models, the user cache)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the decoder to measure")
    parser.add_argument("--embedding-model", default="all-minilm-l6-v2", help="the embedding model to measure")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per measurement; the median is reported")
    parser.add_argument("--engines", default=",".join(ALL_ENGINES),
                        help=f"comma-separated subset of: {', '.join(ALL_ENGINES)} (peers not installed are skipped)")
    parser.add_argument("--tasks", default=",".join(ALL_TASKS), help=f"comma-separated subset of: {', '.join(ALL_TASKS)}")
    parser.add_argument("--in-process", action="store_true",
                        help="load every engine in this one process (default: each in a process of its own)")
    parser.add_argument("--chart", help="write the PNG chart here")
    parser.add_argument("--json", dest="json_out", help="write the raw measurements here")
    parser.add_argument("--no-pull", action="store_true", help="do not pull a missing default model")


def _pick(text: str, allowed) -> list[str]:
    """Comma-separated names, each matched case-insensitively by its start ("llama" ->
    "llama.cpp F32"); ValueError naming a word that matches none."""
    by_lower = {a.lower(): a for a in allowed}
    picked = []
    for word in filter(None, (w.strip() for w in text.split(","))):
        match = by_lower.get(word.lower()) or next((a for a in allowed if a.lower().startswith(word.lower())), None)
        if match is None:
            raise ValueError(f"unknown choice {word!r}; choose from {', '.join(allowed)}")
        picked.append(match)
    return picked


def bench_from_args(args) -> int:
    """`refllm bench`: measure, print the table; 2 for a bad command line."""
    from . import registry

    try:
        if args.rounds < 1:
            raise ValueError("--rounds must be at least 1")
        engines, tasks = _pick(args.engines, ALL_ENGINES), _pick(args.tasks, ALL_TASKS)
    except ValueError as e:
        print(f"refllm bench: error: {e}", file=sys.stderr)
        return 2
    if not args.no_pull:
        from .weights.catalog import CATALOG
        from .weights.pull import ensure_model

        for name, kind in ((args.model, "llama"), (args.embedding_model, "embedding")):
            if name in CATALOG:
                ensure_model(name, kind, args.models_dir)
    llama_dir = registry.find_llm(args.model, args.models_dir) if {"prefill", "decode", "memory"} & set(tasks) else None
    minilm_dir = registry.find_embedding_model(args.embedding_model, args.models_dir) if "embed" in tasks else None
    report = run(llama_dir, minilm_dir, rounds=args.rounds, engines=engines, tasks=tasks,
                 models_dir=args.models_dir, llm_name=args.model, isolate=not args.in_process, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_report(report))
    if args.chart:
        written = write_chart(report, args.chart)
        print(f"\nchart: {written}" if written else "\nchart: not written (pip install matplotlib)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report.to_json(), indent=1))
    return 0


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="refllm bench", description=__doc__.split("\n")[0])
    add_bench_arguments(parser)
    return bench_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
