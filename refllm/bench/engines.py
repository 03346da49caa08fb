"""The engines `refllm bench` times, each behind the same few methods.

A decoder: `prefill(ids) -> next token` (greedy, from an empty state) and `step(token)
-> next token` (one decode step on the state prefill left). refllm's also has
`time_streams(ids, n, mode)`: n sequences decoded together by `Llama.decode_batch`.
An embedder: `embed(texts) -> [N, H]`.

    RefllmLLM        refllm's NumPy Llama (`refllm.generate`'s prefill and decode_one)
    TransformersLLM  transformers' float32 LlamaForCausalLM, with its KV cache
    LlamaCppLLM      llama.cpp through llama-cpp-python, on an F32 GGUF of the same
                     safetensors (`refllm.weights.hf_to_gguf`)
    RefllmEmbedder, SentenceTransformersEmbedder

`time_task(engine, task)` times one round of a task on any of them.
"""

from __future__ import annotations

import time

import numpy as np

from ..weights.hf_to_gguf import ensure_f32_gguf
from .workloads import (DECODE_TOKENS, EMBED_PASSES, LLAMA_CPP, REFLLM, SENTENCE_TRANSFORMERS, SENTENCES,
                        STREAM_STEPS, TRANSFORMERS, parse_streams_task)

# ------------------------------------------------------------------ decoder engines

class RefllmLLM:
    name = REFLLM

    def __init__(self, model_dir):
        from ..llama import Llama
        from ..malloc import retain_freed_memory

        retain_freed_memory()  # as refllm's CLI and server run the model (refllm.malloc)
        self.model = Llama.from_pretrained(model_dir, backend="numpy")
        self.cache = None

    def prefill(self, ids) -> int:
        from ..generate import prefill

        self.cache = self.model.new_cache(len(ids) + DECODE_TOKENS + 1)
        return int(np.argmax(prefill(self.model, ids, self.cache)))

    def step(self, token: int) -> int:
        from ..generate import decode_one

        return int(np.argmax(decode_one(self.model, token, self.cache)))

    def stream_caches(self, ids, n: int, steps: int = STREAM_STEPS):  # -> (n first tokens, n caches)
        """n sequences after the prompt `ids`: prefilled once, the cache copied to all n,
        with room for `steps` more positions."""
        from ..generate import prefill

        first = self.model.new_cache(len(ids) + steps + 1)
        token = int(np.argmax(prefill(self.model, ids, first)))
        caches = [first]
        for _ in range(n - 1):
            cache = self.model.new_cache(first.max_len)
            cache.k[...], cache.v[...], cache.pos = first.k, first.v, first.pos
            caches.append(cache)
        return [token] * n, caches

    def decode_streams(self, tokens, caches, mode: str, steps: int = STREAM_STEPS) -> None:
        """`steps` greedy `decode_batch` steps of all the sequences at once."""
        for _ in range(steps):
            tokens = self.model.decode_batch(tokens, caches, mode).argmax(axis=1)  # [n], the greedy choices

    def time_streams(self, ids, n: int, mode: str, steps: int = STREAM_STEPS) -> float:
        """Seconds of `steps` steps of n streams (`decode_streams`), set up untimed."""
        tokens, caches = self.stream_caches(ids, n, steps)
        t0 = time.perf_counter()
        self.decode_streams(tokens, caches, mode, steps)
        return time.perf_counter() - t0


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
    """Seconds of one timed round of `task` ("prefill", "decode", "embed b1", "embed b32",
    "streams 8 invariant")."""
    if (streams := parse_streams_task(task)) is not None:
        if not hasattr(engine, "time_streams"):
            raise ValueError(f"{engine.name} does not decode streams together")
        return engine.time_streams(ids, *streams)
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


# ------------------------------------------------------------------ embedding engines

class RefllmEmbedder:
    name = REFLLM

    def __init__(self, model_dir):
        from ..embeddings import Embedder
        from ..malloc import retain_freed_memory

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
